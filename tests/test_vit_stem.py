"""The ViT's convolutional stem (PixelConfig.stem="conv"): its 3 × 3 stride-2 convolution equals
lax.conv_general_dilated's; the tower's loss and gradients on 8 devices equal 1 device's; the
stem is size-agnostic (a converted image size keeps its params); bad configs are refused by
name."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldot_jax.checkpoints import convert, pretrained
from ldot_jax.core import parallel
from ldot_jax.models.config import DualEncoderConfig, PixelConfig, TransformerConfig
from ldot_jax.models.vit import CnnStem, ConvStem, VisionTransformer, conv3x3

WIDTH = 16
TEXT = TransformerConfig(vocab_size=64, hidden_size=WIDTH, num_layers=1, num_heads=2,
                         intermediate_size=32, max_position_embeddings=16, hidden_dropout=0.0,
                         attention_dropout=0.0)
VIT = TransformerConfig(vocab_size=1, hidden_size=WIDTH, num_layers=1, num_heads=2,
                        intermediate_size=4 * WIDTH, max_position_embeddings=1)


@pytest.mark.parametrize("side,channels,out,stride", [(8, 3, 5, 2), (16, 4, 8, 2), (6, 2, 3, 2),
                                                      (8, 3, 5, 1), (5, 2, 4, 1)])
def test_conv_equals_lax_convolution(side, channels, out, stride):
    rng = np.random.default_rng(side)
    x = rng.normal(size=(3, side, side, channels)).astype(np.float32)
    kernel = rng.normal(size=(3, 3, channels, out)).astype(np.float32)
    want = jax.lax.conv_general_dilated(x, kernel, (stride, stride), ((1, 1), (1, 1)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    got = conv3x3(jnp.asarray(x), jnp.asarray(kernel), stride)
    assert got.shape == (3, side // stride, side // stride, out)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="odd"):
        conv3x3(jnp.zeros((1, 5, 5, channels)), jnp.asarray(kernel), 2)
    with pytest.raises(ValueError, match="stride 3"):
        conv3x3(jnp.zeros((1, 6, 6, channels)), jnp.asarray(kernel), 3)


def _dual(side=16, patch=4, stem="conv", pool="avg", **channels):
    config = DualEncoderConfig(text=TEXT, image=VIT, project_dim=8, image_tower="vit",
                               pixels=PixelConfig(side, patch, pool=pool, stem=stem, **channels))
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


@pytest.mark.parametrize("stem,pool", [("conv", "avg"), ("cnn", "max"), ("cnn", "map")])
def test_eight_devices_equal_one(stem, pool):
    """A loss of the ViT-with-a-conv-stem dual's vectors and its gradients, the batch sharded
    over 8 devices under an Explicit mesh vs unsharded."""
    config, model = _dual(patch=8 if stem == "cnn" else 4, stem=stem, pool=pool)
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
    assert np.isfinite(float(one)) and float(one) != 0
    np.testing.assert_allclose(float(eight), float(one), rtol=1e-5)
    stem_grads = jax.tree.leaves(one_grad["image_tower"]["visual"]["stem"])
    assert all(np.abs(np.asarray(g)).max() > 0 for g in stem_grads)
    for a, b in zip(jax.tree.leaves(one_grad), jax.tree.leaves(eight_grad)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("stem", ["conv", "cnn"])
def test_another_image_size_keeps_the_stem(stem):
    config, _ = _dual(stem=stem)
    params = _random_params(config)
    bigger, resized = convert.resize_image_input(config, params, 32)
    assert bigger.pixels.image_size == 32 and bigger.pixels.stem == stem
    visual = resized["image_tower"]["visual"]
    assert visual["positional_embedding"].shape == (1 + 64, WIDTH)
    for a, b in zip(jax.tree.leaves(visual["stem"]),
                    jax.tree.leaves(params["image_tower"]["visual"]["stem"])):
        np.testing.assert_array_equal(a, b)
    model = pretrained.build_model("lightningdot", bigger)
    vectors = model.apply({"params": resized}, {"pixels": np.zeros((2, 32, 32, 3), np.uint8)},
                          method="encode_image")
    assert vectors.shape == (2, 8) and np.isfinite(np.asarray(vectors)).all()


def test_max_over_is_max_with_the_gradient_on_the_first_argmax():
    from ldot_jax.models.layers import max_over
    x = jnp.asarray([[1.0, 3.0, 3.0, -2.0], [0.5, -1.0, 0.25, 0.0]])
    np.testing.assert_array_equal(np.asarray(max_over(x, 1)), [3.0, 0.5])
    grad = jax.jit(jax.grad(lambda v: (max_over(v, 1) * jnp.asarray([2.0, 5.0])).sum()))(x)
    np.testing.assert_array_equal(np.asarray(grad), [[0, 2, 0, 0], [5, 0, 0, 0]])
    assert np.isnan(np.asarray(max_over(jnp.asarray([[1.0, np.nan]]), 1))).all()


def _layer_norm(x, p, eps):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def _lax_conv(x, kernel, stride):
    return np.asarray(jax.lax.conv_general_dilated(
        x, kernel, (stride, stride), ((1, 1), (1, 1)),
        dimension_numbers=("NHWC", "HWIO", "NHWC")))


def test_cnn_stem_equals_a_reference():
    """CnnStem against lax convolutions, NumPy LayerNorm / GELU and the max over each patch's
    cell: 32-px images, 8-px patches → a 4 × 4 grid of tokens from the 8 × 8 map."""
    pixels = PixelConfig(32, 8, stem="cnn", stem_channels=(4, 6, 5))
    stem = CnnStem(VIT, pixels)
    rng = np.random.default_rng(3)
    images = rng.normal(size=(2, 32, 32, 3)).astype(np.float32)
    params = stem.init(jax.random.key(0), images)["params"]
    params = jax.tree.map(lambda v: np.asarray(v) + rng.normal(0, 0.1, v.shape), params)
    got = np.asarray(stem.apply({"params": params}, images))
    x = images
    for i, stride in enumerate((2, 2, 1)):
        x = _lax_conv(x, params[f"conv_{i}"].astype(np.float32), stride)
        x = _layer_norm(x, params[f"norm_{i}"], VIT.layer_norm_eps)
        x = np.asarray(jax.nn.gelu(x, approximate=False))
    assert x.shape == (2, 8, 8, 5)
    cells = x.reshape(2, 4, 2, 4, 2, 5).max(axis=(2, 4)).reshape(2, 16, 5)
    want = cells @ params["proj"]
    assert got.shape == (2, 16, WIDTH)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert stem.channels() == (4, 6, 5)
    assert CnnStem(VIT, PixelConfig(64, 16, stem="cnn")).channels() == (8, 8, 8)  # at least 8
    wide = dataclasses.replace(VIT, hidden_size=128, intermediate_size=512)
    assert CnnStem(wide, PixelConfig(64, 16, stem="cnn")).channels() == (16, 32, 32)


def test_max_and_map_pooling_equal_references():
    """pool "max": the max of the patch tokens per feature; pool "map": one learned probe's
    softmax attention over the patch tokens, then + MLP(LN(·)) (big_vision's MAPHead), both
    against NumPy from the trunk's states and the params."""
    rng = np.random.default_rng(5)
    pixels = rng.integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    for pool in ("max", "map"):
        config, model = _dual(patch=4, stem="cnn", pool=pool)
        params = _random_params(config, seed=2)
        image = params["image_tower"]
        states = np.asarray(VisionTransformer(VIT, config.pixels).apply(
            {"params": image["visual"]}, pixels))
        patches = states[:, 1:]
        if pool == "max":
            pooled = patches.max(axis=1)
        else:
            head = image["map_head"]
            n, d = VIT.num_heads, WIDTH // VIT.num_heads
            dense = lambda x, p: x @ p["kernel"] + p["bias"]
            q = dense(head["probe"][None], head["query"]).reshape(1, n, d)
            k, v = np.split(dense(patches, head["key_value"]), 2, axis=-1)
            k, v = k.reshape(3, 16, n, d), v.reshape(3, 16, n, d)
            logits = np.einsum("qnd,bknd->bnk", q, k) / np.sqrt(d)
            probs = np.exp(logits - logits.max(-1, keepdims=True))
            probs /= probs.sum(-1, keepdims=True)
            pooled = dense(np.einsum("bnk,bknd->bnd", probs, v).reshape(3, WIDTH),
                           head["out_proj"])
            inner = np.asarray(jax.nn.gelu(dense(_layer_norm(pooled, head["ln"],
                                                             VIT.layer_norm_eps),
                                                 head["mlp"]["c_fc"]), approximate=False))
            pooled = pooled + dense(inner, head["mlp"]["c_proj"])
        want = pooled @ image["proj"]
        got = model.apply({"params": params}, {"pixels": pixels}, method="encode_image")
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5,
                                   err_msg=pool)


@pytest.mark.parametrize("values,match", [
    (dict(patch_size=12, image_size=48, stem="conv"), "power of 2"),
    (dict(stem="convolution"), r"stem='convolution'.*'patch', 'conv'"),
    (dict(stem="conv", stem_channels=(8,)), r"stem_channels=\(8,\).*expected 5 positive"),
    (dict(stem="conv", patch_size=4, stem_channels=(8, 0)), "positive ints"),
    (dict(stem_channels=(8, 8)), "only the conv and cnn stems"),
    (dict(stem="cnn", patch_size=6, image_size=48), "multiple of 4"),
    (dict(stem="cnn", stem_channels=(8,)), r"cnn stem expects at least 2"),
    (dict(pool="mean"), r"pool='mean'.*'tok', 'avg', 'max', 'map'"),
])
def test_bad_stem_configs(values, match):
    with pytest.raises(ValueError, match=match):
        PixelConfig(**{"image_size": 64, "patch_size": 32, **values})
