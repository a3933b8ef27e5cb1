"""Model behaviour beyond parity: input errors, packing, padding invariance, jit, remat."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ldot_jax
from ldot_jax.models import config as config_lib
from ldot_jax.models.towers import pack_text_and_regions
from ldot_jax.training import losses
from conftest import prefix_mask


@pytest.fixture(scope="module")
def dual(converted):
    return ldot_jax.load_dual_encoder(converted["lightningdot"])


@pytest.fixture(scope="module")
def cross(converted):
    return ldot_jax.load_cross_encoder(converted["uniter_itm"])


def image_args(io):
    return io["in_img_feat"], io["in_img_pos_feat"], io["in_img_attention_mask"][:, 1:]


def text_in(input_ids, attention_mask):
    """The text input pytree."""
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def image_in(region_feat, boxes, region_mask):
    """The region image input pytree."""
    return {"region_feat": region_feat, "boxes": boxes, "region_mask": region_mask}


def test_pack_matches_the_original_gather_index(uniter_io):
    io = uniter_io
    text_mask = prefix_mask(io["in_txt_lens"], io["in_input_ids"].shape[1])
    region_mask = prefix_mask(io["in_num_bbs"], io["in_img_feat"].shape[1])
    index, mask = pack_text_and_regions(jnp.asarray(text_mask), jnp.asarray(region_mask))
    width = io["in_gather_index"].shape[1]
    valid = io["in_attn_masks"].astype(bool)
    np.testing.assert_array_equal(np.asarray(index)[:, :width][valid], io["in_gather_index"][valid])
    np.testing.assert_array_equal(np.asarray(mask)[:, :width], valid)


@pytest.mark.parametrize("case, kwargs, message", [
    ("feat dim", {"feat": (4, 6, 100)}, r"region_feat: last dimension is 100.*feat_dim=2048"),
    ("boxes", {"boxes": (4, 6, 4)}, r"boxes has shape \(4, 6, 4\), expected \(4, 6, 7\)"),
    ("region mask", {"mask": (4, 5)}, r"region_mask has shape \(4, 5\), expected \(4, 6\)"),
])
def test_region_shape_errors_before_compilation(dual, ldot_io, case, kwargs, message):
    model, params = dual
    feat, boxes, mask = image_args(ldot_io)
    shapes = {"feat": feat.shape, "boxes": boxes.shape, "mask": mask.shape} | kwargs
    feat, boxes, mask = (np.zeros(shapes[k], np.float32) for k in ("feat", "boxes", "mask"))
    apply = jax.jit(lambda p, x: model.apply({"params": p}, x, method=model.encode_image))
    with pytest.raises(ValueError, match=message):  # raised while tracing, before XLA
        apply(params, image_in(feat, boxes, mask))


def test_text_errors(dual, ldot_io):
    model, params = dual
    ids, mask = ldot_io["in_txt_input_ids"], ldot_io["in_txt_attention_mask"]
    encode = lambda i, m: model.apply({"params": params}, text_in(i, m),
                                      method=model.encode_text)
    with pytest.raises(ValueError, match=r"attention_mask has shape \(4, 8\) but input_ids has "
                                         r"shape \(4, 9\)"):
        encode(ids, mask[:, :8])
    bad = ids.copy()
    bad[1, 2] = 128
    with pytest.raises(ValueError, match=r"token ids \[128\] are outside the vocabulary "
                                         r"\[0, 128\)"):
        encode(bad, mask)
    with pytest.raises(ValueError, match="length 65 exceeds max_position_embeddings=64"):
        encode(np.ones((1, 65), np.int32), np.ones((1, 65), np.int32))
    with pytest.raises(ValueError, match=r"attention_mask: expected 0/1.*\[2\]"):
        encode(ids, mask * 2)
    with pytest.raises(ValueError, match="expected integer token ids"):
        encode(ids.astype(np.float32), mask)


def test_cross_encoder_needs_prefix_masks_and_equal_batches(cross, uniter_io):
    model, params = cross
    io = uniter_io
    text_mask = prefix_mask(io["in_txt_lens"], 8)
    region_mask = prefix_mask(io["in_num_bbs"], 6)
    region_mask[0, 0] = 0
    with pytest.raises(ValueError, match=r"region_mask: rows \[0\] have padding before"):
        model.apply({"params": params}, text_in(io["in_input_ids"], text_mask),
                    image_in(io["in_img_feat"], io["in_img_pos_feat"], region_mask))
    with pytest.raises(ValueError, match="batch sizes differ"):
        model.apply({"params": params}, text_in(io["in_input_ids"][:3], text_mask[:3]),
                    image_in(io["in_img_feat"], io["in_img_pos_feat"],
                             prefix_mask(io["in_num_bbs"], 6)))


def test_padding_does_not_change_outputs(dual, cross, ldot_io, uniter_io):
    """Extra padded tokens / regions leave every real output unchanged."""
    model, params = dual
    io = ldot_io
    pad = lambda x, n: np.pad(x, [(0, 0), (0, n)] + [(0, 0)] * (x.ndim - 2))
    ids, mask = io["in_txt_input_ids"], io["in_txt_attention_mask"]
    text = lambda i, m: model.apply({"params": params}, text_in(i, m), method=model.encode_text)
    np.testing.assert_allclose(text(pad(ids, 7), pad(mask, 7)), text(ids, mask), atol=1e-5)
    feat, boxes, rmask = image_args(io)
    image = lambda *a: model.apply({"params": params}, image_in(*a), method=model.encode_image)
    np.testing.assert_allclose(image(pad(feat, 5), pad(boxes, 5), pad(rmask, 5)),
                               image(feat, boxes, rmask), atol=1e-5)
    cmodel, cparams = cross
    u = uniter_io
    score = lambda i, t, f, b, r: cmodel.apply({"params": cparams}, text_in(i, t),
                                               image_in(f, b, r), method=cmodel.score)
    tm, rm = prefix_mask(u["in_txt_lens"], 8), prefix_mask(u["in_num_bbs"], 6)
    np.testing.assert_allclose(
        score(pad(u["in_input_ids"], 4), pad(tm, 4), pad(u["in_img_feat"], 3),
              pad(u["in_img_pos_feat"], 3), pad(rm, 3)),
        score(u["in_input_ids"], tm, u["in_img_feat"], u["in_img_pos_feat"], rm), atol=1e-5)


def test_jit_and_remat_match_eager(converted, ldot_io):
    io = ldot_io
    eager_model, params = ldot_jax.load_dual_encoder(converted["lightningdot"])
    remat_model, _ = ldot_jax.load_dual_encoder(converted["lightningdot"], remat=True)
    args = (text_in(io["in_txt_input_ids"], io["in_txt_attention_mask"]),
            image_in(*image_args(io)))

    def loss(model, p):
        text, image = model.apply({"params": p}, *args)
        return losses.reference_contrastive_loss(text.embedding, image.embedding)

    eager = loss(eager_model, params)
    jitted, grads = jax.jit(jax.value_and_grad(lambda p: loss(eager_model, p)))(params)
    remat, remat_grads = jax.jit(jax.value_and_grad(lambda p: loss(remat_model, p)))(params)
    np.testing.assert_allclose(jitted, eager, atol=1e-6)
    np.testing.assert_allclose(remat, eager, atol=1e-6)
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(remat_grads)):
        np.testing.assert_allclose(r, g, rtol=1e-5, atol=1e-6)
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))


def test_dropout_only_in_training(dual, ldot_io):
    model, params = dual
    io = ldot_io
    run = lambda det, seed: model.apply(
        {"params": params}, text_in(io["in_txt_input_ids"], io["in_txt_attention_mask"]), det,
        method=model.encode_text, rngs={"dropout": jax.random.key(seed)})
    np.testing.assert_array_equal(run(True, 0), run(True, 1))
    assert np.abs(np.asarray(run(False, 0)) - np.asarray(run(False, 1))).max() > 1e-3


def test_fused_attention_refuses_dropout_in_training(converted, ldot_io):
    model, params = ldot_jax.load_dual_encoder(converted["lightningdot"], attention_impl="fused")
    io = ldot_io
    with pytest.raises(ValueError, match="attention_impl='fused' has no attention dropout"):
        model.apply({"params": params}, text_in(io["in_txt_input_ids"],
                                                io["in_txt_attention_mask"]),
                    False, method=model.encode_text, rngs={"dropout": jax.random.key(0)})


def test_config_errors_and_round_trip():
    base = config_lib.base_dual_encoder_config()
    assert config_lib.from_dict(config_lib.DualEncoderConfig, config_lib.to_dict(base)) == base
    with pytest.raises(ValueError, match="hidden_size=100 is not divisible by num_heads=12"):
        config_lib.TransformerConfig(hidden_size=100)
    with pytest.raises(ValueError, match="attention_impl='flash'"):
        config_lib.TransformerConfig(attention_impl="flash")
    with pytest.raises(ValueError, match=r"config.text: unknown key\(s\) \['hiden_size'\]"):
        config_lib.from_dict(config_lib.DualEncoderConfig, {"text": {"hiden_size": 3}})
    with pytest.raises(ValueError, match=r"\['dtyp'\] cannot be overridden.*'dtype'"):
        config_lib.replace_numerics(base, dtyp="bfloat16")
    with pytest.raises(ValueError, match="hidden_size"):
        config_lib.replace_numerics(base, hidden_size=12)
    bf16 = config_lib.replace_numerics(base, dtype="bfloat16")
    assert bf16.text.dtype == bf16.image.dtype == "bfloat16"
    assert dataclasses.replace(bf16.text, dtype="float32") == base.text


def test_towers_are_built_by_name(dual, ldot_io):
    """DualEncoderConfig names its towers; a typo lists the registered ones; an input pytree
    missing a field names it."""
    from ldot_jax.models import towers
    model, params = dual
    assert (model.config.text_tower, model.config.image_tower) == ("bert", "uniter_regions")
    assert isinstance(towers.image_tower("uniter_regions").build(model.config),
                      towers.RegionTower)
    typo = dataclasses.replace(model.config, image_tower="vit_b32")
    with pytest.raises(ValueError,
                       match=r"unknown image tower 'vit_b32'.*\['uniter_regions', 'vit'\]"):
        ldot_jax.DualEncoder(typo).apply({"params": params}, image_in(*image_args(ldot_io)),
                                         method=ldot_jax.DualEncoder.encode_image)
    with pytest.raises(ValueError, match=r"unknown text tower 'clap'.*\['bert', 'clip'\]"):
        towers.text_tower("clap")
    feat, boxes, _ = image_args(ldot_io)
    with pytest.raises(ValueError, match=r"missing \['region_mask'\]"):
        model.apply({"params": params}, {"region_feat": feat, "boxes": boxes},
                    method=model.encode_image)
