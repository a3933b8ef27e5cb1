"""The ViT's convolutional stem (PixelConfig.stem="conv"): its 3 × 3 stride-2 convolution equals
lax.conv_general_dilated's; the tower's loss and gradients on 8 devices equal 1 device's; the
stem is size-agnostic (a converted image size keeps its params); bad configs are refused by
name."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldot_jax.checkpoints import convert, pretrained
from ldot_jax.core import parallel
from ldot_jax.models.config import DualEncoderConfig, PixelConfig, TransformerConfig
from ldot_jax.models.vit import ConvStem, conv3x3_stride2

WIDTH = 16
TEXT = TransformerConfig(vocab_size=64, hidden_size=WIDTH, num_layers=1, num_heads=2,
                         intermediate_size=32, max_position_embeddings=16, hidden_dropout=0.0,
                         attention_dropout=0.0)
VIT = TransformerConfig(vocab_size=1, hidden_size=WIDTH, num_layers=1, num_heads=2,
                        intermediate_size=4 * WIDTH, max_position_embeddings=1)


@pytest.mark.parametrize("side,channels,out", [(8, 3, 5), (16, 4, 8), (6, 2, 3)])
def test_conv_equals_lax_convolution(side, channels, out):
    rng = np.random.default_rng(side)
    x = rng.normal(size=(3, side, side, channels)).astype(np.float32)
    kernel = rng.normal(size=(3, 3, channels, out)).astype(np.float32)
    want = jax.lax.conv_general_dilated(x, kernel, (2, 2), ((1, 1), (1, 1)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    got = conv3x3_stride2(jnp.asarray(x), jnp.asarray(kernel))
    assert got.shape == (3, side // 2, side // 2, out)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="odd"):
        conv3x3_stride2(jnp.zeros((1, 5, 5, channels)), jnp.asarray(kernel))


def _dual(side=16, patch=4, **stem):
    config = DualEncoderConfig(text=TEXT, image=VIT, project_dim=8, image_tower="vit",
                               pixels=PixelConfig(side, patch, pool="avg", stem="conv", **stem))
    return config, pretrained.build_model("lightningdot", config)


def _random_params(config, seed=0):
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        noise = rng.normal(0.0, 0.2, leaf.shape).astype(np.float32)
        return 1.0 + noise / 2 if "scale" in jax.tree_util.keystr(path) else noise
    return jax.tree.map(np.asarray, jax.tree.map_with_path(
        draw, pretrained.abstract_params("lightningdot", config)))


def test_stem_params_and_default_channels():
    config, _ = _dual()
    visual = _random_params(config)["image_tower"]["visual"]
    assert "conv1" not in visual
    stem = visual["stem"]
    # 16 / 4: two stride-2 convolutions, width / 2 then the width; a 1 × 1 projection.
    assert stem["conv_0"].shape == (3, 3, 3, WIDTH // 2)
    assert stem["conv_1"].shape == (3, 3, WIDTH // 2, WIDTH)
    assert stem["proj"].shape == (WIDTH, WIDTH)
    assert visual["positional_embedding"].shape == (1 + 16, WIDTH)
    config, _ = _dual(stem_channels=(4, 12))
    stem = _random_params(config)["image_tower"]["visual"]["stem"]
    assert stem["conv_1"].shape == (3, 3, 4, 12) and stem["proj"].shape == (12, WIDTH)
    assert ConvStem(VIT, PixelConfig(64, 16, stem="conv")).channels() == (8, 8, 8, 16)  # at least 8


def test_eight_devices_equal_one():
    """A loss of the ViT-with-conv-stem dual's vectors and its gradients, the batch sharded
    over 8 devices under an Explicit mesh vs unsharded."""
    config, model = _dual()
    params = _random_params(config)
    rng = np.random.default_rng(1)
    batch = 8
    pixels = rng.integers(0, 256, (batch, 16, 16, 3), dtype=np.uint8)
    ids = rng.integers(3, 64, (batch, 6)).astype(np.int32)
    text = {"input_ids": ids, "attention_mask": np.ones_like(ids)}

    def loss(p, text, pixels):
        t = model.apply({"params": p}, text, method="encode_text")
        v = model.apply({"params": p}, {"pixels": pixels}, method="encode_image")
        return jnp.mean(jnp.sum(t * v, axis=1) + jnp.sum(v ** 3, axis=1))
    step = jax.jit(jax.value_and_grad(loss))
    one, one_grad = step(params, text, pixels)
    mesh = parallel.make_mesh()
    assert mesh.devices.size == 8
    with jax.set_mesh(mesh):
        sharded = parallel.global_batch({"text": text, "pixels": pixels}, mesh)
        eight, eight_grad = step(parallel.replicate(params, mesh), sharded["text"],
                                 sharded["pixels"])
    assert np.isfinite(float(one)) and float(one) > 0
    np.testing.assert_allclose(float(eight), float(one), rtol=1e-5)
    stem_grads = jax.tree.leaves(one_grad["image_tower"]["visual"]["stem"])
    assert all(np.abs(np.asarray(g)).max() > 0 for g in stem_grads)
    for a, b in zip(jax.tree.leaves(one_grad), jax.tree.leaves(eight_grad)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6)


def test_another_image_size_keeps_the_stem():
    config, _ = _dual()
    params = _random_params(config)
    bigger, resized = convert.resize_image_input(config, params, 32)
    assert bigger.pixels.image_size == 32 and bigger.pixels.stem == "conv"
    visual = resized["image_tower"]["visual"]
    assert visual["positional_embedding"].shape == (1 + 64, WIDTH)
    for a, b in zip(jax.tree.leaves(visual["stem"]),
                    jax.tree.leaves(params["image_tower"]["visual"]["stem"])):
        np.testing.assert_array_equal(a, b)
    model = pretrained.build_model("lightningdot", bigger)
    vectors = model.apply({"params": resized}, {"pixels": np.zeros((2, 32, 32, 3), np.uint8)},
                          method="encode_image")
    assert vectors.shape == (2, 8) and np.isfinite(np.asarray(vectors)).all()


@pytest.mark.parametrize("values,match", [
    (dict(patch_size=12, image_size=48, stem="conv"), "power of 2"),
    (dict(stem="convolution"), r"stem='convolution'.*'patch', 'conv'"),
    (dict(stem="conv", stem_channels=(8,)), r"stem_channels=\(8,\).*expected 5 positive"),
    (dict(stem="conv", patch_size=4, stem_channels=(8, 0)), "positive ints"),
    (dict(stem_channels=(8, 8)), "only the conv stem"),
])
def test_bad_stem_configs(values, match):
    with pytest.raises(ValueError, match=match):
        PixelConfig(**{"image_size": 64, "patch_size": 32, **values})
