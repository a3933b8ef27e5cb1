"""Sharded contrastive losses on 8 simulated devices equal dense single-device references, in
value and gradient: global and local negatives, chunked and not, multi-positives, padding,
normalization and temperature, the sigmoid variant, Matryoshka prefixes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldot_jax.training import contrastive, losses
from ldot_jax.training.contrastive import ContrastiveConfig

B, D, DEVICES = 32, 12, 8


@pytest.fixture(scope="module")
def mesh():
    assert jax.device_count() >= DEVICES
    return jax.make_mesh((DEVICES,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    text = rng.normal(size=(B, D)).astype(np.float32)
    image = rng.normal(size=(B, D)).astype(np.float32)
    group = rng.integers(0, 12, B).astype(np.int32)  # repeated image ids: multi-positives
    image[group == group[0]] = image[0]  # captions of one image share its embedding
    valid = np.ones(B, bool)
    valid[[5, 17, 30]] = False
    return text, image, group, valid


def dense_reference(text, image, group, valid, config, scale=1.0, bias=0.0):
    """The loss on the whole batch with dense matrices and explicit targets."""
    if config.normalize:
        text = text / jnp.linalg.norm(text, axis=-1, keepdims=True)
        image = image / jnp.linalg.norm(image, axis=-1, keepdims=True)
    ids = group if config.same_image_positives else jnp.arange(len(text))
    positive = (ids[:, None] == ids[None, :]) & valid[None, :]
    s = scale * text @ image.T
    w = valid.astype(jnp.float32)
    if config.kind == "sigmoid":
        sign = jnp.where(positive, 1.0, -1.0)
        rows = jnp.sum(-jax.nn.log_sigmoid(sign * (s + bias)) * w[None, :], axis=1)
        return jnp.sum(rows * w) / jnp.sum(w)
    masked = jnp.where(valid[None, :], s, -jnp.inf)
    targets = positive / jnp.maximum(positive.sum(1, keepdims=True), 1)  # padding rows: none
    t2i = -jnp.sum(targets * jnp.where(valid[None, :], jax.nn.log_softmax(masked, 1), 0), 1)
    masked_t = jnp.where(valid[None, :], s.T, -jnp.inf)
    i2t = -jnp.sum(targets * jnp.where(valid[None, :], jax.nn.log_softmax(masked_t, 1), 0), 1)
    return jnp.sum((0.5 * t2i + 0.5 * i2t) * w) / jnp.sum(w)


def local_reference(text, image, group, valid, config):
    """Local negatives: the mean over devices of each device's own dense loss."""
    shards = [slice(d * B // DEVICES, (d + 1) * B // DEVICES) for d in range(DEVICES)]
    return sum(dense_reference(text[s], image[s], group[s], valid[s], config)
               for s in shards) / DEVICES


def _value_and_grads(fn, text, image):
    return jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))(text, image)


def _check(got, want):
    np.testing.assert_allclose(got[0], want[0], atol=1e-5, rtol=1e-5)
    for g, w in zip(got[1], want[1]):
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5)


CONFIGS = [
    ContrastiveConfig(),
    ContrastiveConfig(chunk_size=8),
    ContrastiveConfig(same_image_positives=True),
    ContrastiveConfig(same_image_positives=True, chunk_size=4, normalize=True),
    ContrastiveConfig(kind="sigmoid", same_image_positives=True),
    ContrastiveConfig(kind="sigmoid", chunk_size=8, normalize=True),
]


@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_global_negatives_equal_the_dense_reference(mesh, batch, config):
    text, image, group, valid = batch
    scale, bias = (10.0, -2.0) if config.normalize else (1.0, 0.0)
    got = _value_and_grads(lambda t, i: contrastive.contrastive_loss(
        t, i, group, valid, mesh, config, scale, bias), text, image)
    want = _value_and_grads(lambda t, i: dense_reference(t, i, group, valid, config, scale,
                                                         bias), text, image)
    _check(got, want)


@pytest.mark.parametrize("config", [ContrastiveConfig(negatives="local"),
                                    ContrastiveConfig(negatives="local",
                                                      same_image_positives=True)], ids=str)
def test_local_negatives_average_the_devices(mesh, batch, config):
    text, image, group, valid = batch
    got = _value_and_grads(lambda t, i: contrastive.contrastive_loss(
        t, i, group, valid, mesh, config), text, image)
    want = _value_and_grads(lambda t, i: local_reference(t, i, group, valid, config),
                            text, image)
    _check(got, want)


def test_faithful_default_is_the_original_loss(mesh, batch):
    """One device or eight, all rows valid, no options: LightningDOT's in-batch loss."""
    text, image, group, _ = batch
    valid = np.ones(B, bool)
    original = losses.reference_contrastive_loss(text, image)
    for m in (None, mesh):
        np.testing.assert_allclose(contrastive.contrastive_loss(text, image, group, valid, m),
                                   original, atol=1e-5)


def test_learnable_temperature_gets_its_gradient(mesh, batch):
    text, image, group, valid = batch
    config = ContrastiveConfig(normalize=True)
    with jax.set_mesh(mesh):  # as the train step runs: the scale is replicated over the mesh
        got = jax.jit(jax.grad(lambda s: contrastive.contrastive_loss(
            text, image, group, valid, mesh, config, s)))(jnp.float32(5.0))
    want = jax.grad(lambda s: dense_reference(text, image, group, valid, config, s))(5.0)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_matryoshka_prefixes(mesh, batch):
    text, image, group, valid = batch
    config = ContrastiveConfig(normalize=True)
    got = contrastive.matryoshka_loss(text, image, group, valid, mesh, config, (4, 8, 12),
                                      (0.5, 0.25, 1.0), scale=10.0)
    want = sum(w * dense_reference(text[:, :d], image[:, :d], group, valid, config, 10.0)
               for d, w in zip((4, 8, 12), (0.5, 0.25, 1.0)))
    np.testing.assert_allclose(got, want, atol=1e-5)
    with pytest.raises(ValueError, match=r"prefix dims \(4, 16\) exceed the embedding size 12"):
        contrastive.matryoshka_loss(text, image, group, valid, mesh, config, (4, 16))


def test_bad_settings(mesh, batch):
    text, image, group, valid = batch
    with pytest.raises(ValueError, match="negatives 'all'"):
        ContrastiveConfig(negatives="all")
    with pytest.raises(ValueError, match="chunk_size=5 does not divide the 32 columns"):
        contrastive.contrastive_loss(text, image, group, valid, mesh,
                                     ContrastiveConfig(chunk_size=5))
