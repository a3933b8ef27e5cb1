"""UNITER's released pre-training checkpoints (`UniterForPretraining`, the layout of
uniter-base.pt): converted, the model reproduces the original's outputs (tests/data/
uniter_pretrain_small_io.npz, written by the original code; ≤ 1e-5): the trunk's sequence and
pooled outputs, ITM logits, MLM logits at the masked tokens, MRFR and MRC outputs at the masked
regions. The converted directory initializes LightningDOT's image tower (as the paper does),
the text tower and a re-ranker; it exports back to the original names; the ITM converter
names the right kind for it."""

import os

import jax
import numpy as np
import pytest

import ldot_jax
from ldot_jax.checkpoints import convert, initialize, pretrained
from ldot_jax.models.config import DualEncoderConfig

from conftest import DATA, SMALL_HEADS, prefix_mask

ATOL = 1e-5
WEIGHTS = DATA / "uniter_pretrain_small_weights.npz"


@pytest.fixture(scope="module")
def io():
    return dict(np.load(DATA / "uniter_pretrain_small_io.npz"))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return ldot_jax.convert_checkpoint("uniter_pretrain", WEIGHTS,
                                       tmp_path_factory.mktemp("uniter") / "model",
                                       num_heads=SMALL_HEADS)


@pytest.fixture(scope="module", params=["xla", "fused"])
def loaded(request, model_dir):
    loaded = pretrained.load_pretrained(model_dir, attention_impl=request.param)
    return pretrained.build_model(loaded.kind, loaded.config), {"params": loaded.params}


def inputs(io, ids="in_input_ids"):
    text = {"input_ids": io[ids],
            "attention_mask": prefix_mask(io["in_txt_lens"], io["in_input_ids"].shape[1])}
    image = {"region_feat": io["in_img_feat"], "boxes": io["in_img_pos_feat"],
             "region_mask": prefix_mask(io["in_num_bbs"], io["in_img_feat"].shape[1])}
    return text, image


def close(actual, expected):
    actual = np.asarray(actual)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    worst = float(np.abs(actual - expected).max())
    assert worst <= ATOL, f"worst abs diff {worst}"


def test_the_converter_infers_the_model_and_uses_every_key(model_dir):
    loaded = pretrained.load_pretrained(model_dir)
    assert loaded.kind == "uniter_pretrain"
    c = loaded.config
    assert (c.transformer.hidden_size, c.transformer.num_layers, c.transformer.vocab_size,
            c.region.feat_dim, c.region.num_classes) == (32, 2, 128, 2048, 1601)
    assert set(loaded.params) == {"uniter", "pooler", "itm_output", "mlm_head", "mrfr_head",
                                  "mrc_head"}


def test_trunk_pooled_and_itm_equal_the_original(loaded, io):
    model, variables = loaded
    text, image = inputs(io)
    sequence, mask = model.apply(variables, text, image, method=model.states)
    real = io["in_attn_masks"].astype(bool)
    width = real.shape[1]  # the original pads to max(text + regions); ours to L + R
    np.testing.assert_array_equal(np.asarray(mask)[:, :width], real)
    close(np.asarray(sequence)[:, :width][real], io["out_sequence_output"][real])
    close(model.apply(variables, text, image, method=model.pooled), io["out_pooled"])
    close(model.apply(variables, text, image, method=model.itm_logits), io["out_itm_scores"])


def test_mlm_logits_at_the_masked_tokens_equal_the_original(loaded, io):
    model, variables = loaded
    text, image = inputs(io, "in_mlm_input_ids")
    masked = io["in_txt_labels"] != -1
    everywhere = np.asarray(model.apply(variables, text, image, method=model.mlm_logits))
    close(everywhere[masked], io["out_mlm_scores"])  # row-major, as the original gathers
    rows, cols = np.nonzero(masked)  # …and through positions (the training path)
    positions = np.zeros((4, masked.sum(1).max()), np.int32)
    for b in range(4):
        positions[b, :masked[b].sum()] = cols[rows == b]
    gathered = np.asarray(model.apply(variables, text, image, positions,
                                      method=model.mlm_logits))
    close(np.concatenate([gathered[b, :masked[b].sum()] for b in range(4)]),
          io["out_mlm_scores"])


def test_mrfr_and_mrc_at_the_masked_regions_equal_the_original(loaded, io):
    model, variables = loaded
    text, image = inputs(io)
    masks = io["in_img_masks"].astype(np.int32)
    chosen = masks.astype(bool)
    # The original model adds its mask row to the features it is given (the fixture's input
    # is not zeroed): zero_masked=False is the model alone.
    mrfr = model.apply(variables, text, image, masks, zero_masked=False,
                       method=model.mrfr_prediction)
    mrc = model.apply(variables, text, image, masks, zero_masked=False,
                      method=model.mrc_logits)
    close(np.asarray(mrfr)[chosen], io["out_mrfr_pred"])
    close(np.asarray(mrc)[chosen], io["out_mrc_logits"])
    # The regions follow each caption's real tokens: the original's packed target mask.
    target = np.zeros(io["out_img_mask_tgt"].shape, bool)
    for b, j in zip(*np.nonzero(chosen)):
        target[b, io["in_txt_lens"][b] + j] = True
    np.testing.assert_array_equal(target, io["out_img_mask_tgt"].astype(bool))
    # zero_masked=True (the default, UNITER's collate): masked features do not matter.
    noisy = dict(image, region_feat=np.where(chosen[..., None], 7.0, image["region_feat"]))
    np.testing.assert_allclose(
        model.apply(variables, text, noisy, masks, method=model.mrfr_prediction),
        model.apply(variables, text, image, masks, method=model.mrfr_prediction), atol=1e-6)


def test_it_initializes_the_image_tower_the_text_tower_and_a_reranker(model_dir):
    loaded = pretrained.load_pretrained(model_dir)
    source, config = loaded.params, loaded.config
    dual_cfg = DualEncoderConfig(text=config.transformer, image=config.transformer,
                                 region=config.region, project_dim=24)
    fresh = jax.device_get(pretrained.init_params("lightningdot", dual_cfg, jax.random.key(1)))
    init = initialize.from_pretrained(fresh, "lightningdot", {"image": str(model_dir),
                                                              "text": str(model_dir)})
    jax.tree.map(np.testing.assert_array_equal, init["image_tower"]["uniter"],
                 source["uniter"])
    jax.tree.map(np.testing.assert_array_equal, init["image_tower"]["encode_proj"],
                 fresh["image_tower"]["encode_proj"])  # not in UNITER: kept
    jax.tree.map(np.testing.assert_array_equal, init["text_tower"]["bert"]["encoder"],
                 source["uniter"]["encoder"])
    rerank = jax.device_get(pretrained.init_params("uniter_itm", config, jax.random.key(2)))
    warm = initialize.from_pretrained(rerank, "uniter_itm", {"model": str(model_dir)})
    for name in ("uniter", "pooler", "itm_output"):
        jax.tree.map(np.testing.assert_array_equal, warm[name], source[name])
    jax.tree.map(np.testing.assert_array_equal, warm["rank_output"], rerank["rank_output"])


def test_it_exports_back_to_the_original_names(model_dir):
    loaded = pretrained.load_pretrained(model_dir)
    state = convert.params_to_state_dict(loaded.kind, loaded.params)
    with np.load(WEIGHTS) as original:
        assert set(state) == set(original.files)  # the tied copies included
        for key in original.files:
            np.testing.assert_array_equal(state[key], original[key], err_msg=key)


def test_the_itm_converter_points_a_pretraining_checkpoint_to_its_kind(tmp_path):
    with pytest.raises(ValueError, match=r"UNITER pre-training checkpoint .*--kind "
                                         r"uniter_pretrain"):
        ldot_jax.convert_checkpoint("uniter_itm", WEIGHTS, tmp_path / "itm",
                                    num_heads=SMALL_HEADS)
    assert not os.path.exists(tmp_path / "itm")
