"""Parity with the original PyTorch LightningDOT / UNITER outputs (shared/parity fixtures).

Everything goes through the public API: convert_checkpoint → load_* → Module.apply, in
float32 on CPU. Worst absolute difference ≤ 1e-5.
"""

import jax
import numpy as np
import pytest

import ldot_jax
from ldot_jax.training import losses
from conftest import prefix_mask

ATOL = 1e-5
IMPLS = ["xla", "fused"]


def assert_close(actual, expected, where=None):
    actual = np.asarray(actual)
    if where is not None:
        actual, expected = actual[where], expected[where]
    assert actual.shape == expected.shape
    worst = np.abs(actual - expected).max()
    assert worst <= ATOL, f"worst abs diff {worst}"


def region_mask(io):
    return io["in_img_attention_mask"][:, 1:]  # drop the image tower's [CLS] column


def text_of(io, ids="in_txt_input_ids"):
    """The original's caption inputs as our text input pytree."""
    return {"input_ids": io[ids], "attention_mask": io["in_txt_attention_mask"]}


def image_of(io, features="in_img_feat"):
    """The original's image inputs as our region input pytree."""
    return {"region_feat": io[features], "boxes": io["in_img_pos_feat"],
            "region_mask": region_mask(io)}


@pytest.fixture(scope="module", params=IMPLS)
def dual(request, converted, ldot_io):
    model, params = ldot_jax.load_dual_encoder(converted["lightningdot"],
                                               attention_impl=request.param)
    io = ldot_io
    variables = {"params": params}
    text = model.apply(variables, text_of(io), method=model.text_states)
    image = model.apply(variables, image_of(io), method=model.image_states)
    return model, params, text, image


def test_text_tower_sequence(dual, ldot_io):
    _, _, text, _ = dual
    assert_close(text.sequence, ldot_io["out_txt_seq"],
                 ldot_io["in_txt_attention_mask"].astype(bool))


def test_image_tower_sequence(dual, ldot_io):
    _, _, _, image = dual
    assert_close(image.sequence, ldot_io["out_img_seq"],
                 ldot_io["in_img_attention_mask"].astype(bool))


def test_retrieval_vectors_and_scores(dual, ldot_io):
    model, params, text, image = dual
    assert_close(text.embedding, ldot_io["out_txt_pooled"])
    assert_close(image.embedding, ldot_io["out_img_pooled"])
    assert_close(ldot_jax.dot_scores(text.embedding, image.embedding),
                 ldot_io["out_scores_txt_img"])
    io = ldot_io
    scores = model.apply({"params": params}, text_of(io), image_of(io), method=model.score)
    assert_close(scores, io["out_scores_txt_img"])
    # The exact inner-product top-4 of the original's FAISS index.
    top_scores, top_ids = jax.lax.top_k(scores, 4)
    np.testing.assert_array_equal(top_ids, io["out_faiss_t2i_ids"])
    assert_close(top_scores, io["out_faiss_t2i_scores"])


def test_finetune_loss(dual, ldot_io):
    _, _, text, image = dual
    assert_close(losses.reference_contrastive_loss(text.embedding, image.embedding),
                 ldot_io["out_loss_finetune"])
    per_example = losses.contrastive_loss_per_example(text.embedding, image.embedding)
    assert_close(per_example, ldot_io["pre_cmr_loss_per_example"])
    # Each direction alone: the original's NLL of text→image and image→text.
    scores = ldot_jax.dot_scores(text.embedding, image.embedding)
    diag = np.arange(4)
    assert_close(-np.asarray(jax.nn.log_softmax(scores, 1))[diag, diag].mean(),
                 ldot_io["out_loss_txt_query"])
    assert_close(-np.asarray(jax.nn.log_softmax(scores, 0))[diag, diag].mean(),
                 ldot_io["out_loss_img_query"])


@pytest.fixture(scope="module", params=IMPLS)
def cross(request, converted, uniter_io):
    model, params = ldot_jax.load_cross_encoder(converted["uniter_itm"],
                                                attention_impl=request.param)
    io = uniter_io
    out = model.apply(
        {"params": params},
        {"input_ids": io["in_input_ids"],
         "attention_mask": prefix_mask(io["in_txt_lens"], io["in_input_ids"].shape[1])},
        {"region_feat": io["in_img_feat"], "boxes": io["in_img_pos_feat"],
         "region_mask": prefix_mask(io["in_num_bbs"], io["in_img_feat"].shape[1])})
    return out


def test_cross_encoder_sequence(cross, uniter_io):
    mask = uniter_io["in_attn_masks"].astype(bool)
    width = mask.shape[1]  # the original pads to max(tl + nbb); ours to L + R
    np.testing.assert_array_equal(np.asarray(cross.mask)[:, :width], mask)
    assert not np.asarray(cross.mask)[:, width:].any()
    assert_close(np.asarray(cross.sequence)[:, :width], uniter_io["out_sequence_output"], mask)


def test_cross_encoder_pooled_and_rank_score(cross, uniter_io):
    assert_close(cross.pooled, uniter_io["out_pooled"])
    assert_close(cross.rank_score, uniter_io["out_rank_scores"][:, 0])


@pytest.fixture(scope="module", params=IMPLS)
def pretrain(request, converted):
    return ldot_jax.load_pretraining_model(converted["lightningdot_pretrain"],
                                           attention_impl=request.param)


def test_vmlm_logits_and_loss(pretrain, ldot_io):
    model, params = pretrain
    io = ldot_io
    logits = model.apply({"params": params}, text_of(io, "pre_mlm_input_ids"), image_of(io),
                         method=model.vmlm_logits)
    labels = io["pre_mlm_txt_labels"]
    masked = labels != -1
    assert_close(np.asarray(logits)[masked], io["pre_mlm_scores"])
    log_probs = np.asarray(jax.nn.log_softmax(logits, -1))[masked]
    assert_close(-log_probs[np.arange(masked.sum()), labels[masked]],
                 io["pre_mlm_loss_per_token"])
    assert_close(losses.masked_lm_loss(logits, labels), io["pre_mlm_loss_mean"])
    # Gathering the masked positions first (the training path) gives the same logits.
    rows, cols = np.nonzero(masked)
    positions = np.zeros((4, 2), np.int32)
    counts = np.zeros(4, int)
    for r, c in zip(rows, cols):
        positions[r, counts[r]] = c
        counts[r] += 1
    gathered = model.apply({"params": params}, text_of(io, "pre_mlm_input_ids"), image_of(io),
                           positions, method=model.vmlm_logits)
    take = np.arange(2)[None, :] < counts[:, None]
    assert_close(np.asarray(gathered)[take], io["pre_mlm_scores"])


@pytest.mark.parametrize("features", ["in_img_feat", "pre_mrm_img_feat_masked"])
def test_smrm_heads_and_losses(pretrain, ldot_io, features):
    """The model replaces masked regions itself, so raw or pre-zeroed features agree."""
    model, params = pretrain
    io = ldot_io
    masks = io["pre_mrm_img_masks"]
    np.testing.assert_array_equal(io["pre_mrm_img_mask_tgt"][:, 1:], masks)
    args = (text_of(io), image_of(io, features), masks)
    prediction = model.apply({"params": params}, *args, method=model.mrfr_prediction)
    assert_close(np.asarray(prediction)[masks], io["pre_mrfr_pred"])
    np.testing.assert_array_equal(io["in_img_feat"][masks], io["pre_mrfr_feat_targets"])
    assert_close(losses.mrfr_loss(prediction, io["in_img_feat"], masks),
                 io["pre_mrfr_loss_mean"])
    logits = model.apply({"params": params}, *args, method=model.mrc_logits)
    # The fixture stores the original's log-softmax output (it feeds kl_div directly).
    assert_close(np.asarray(jax.nn.log_softmax(logits, -1))[masks], io["pre_mrc_logits"])
    soft_labels = np.zeros(logits.shape, np.float32)
    soft_labels[masks] = io["pre_mrc_label_targets"]
    kl = losses.mrc_kl_loss(logits, soft_labels, masks)
    assert_close(kl, io["pre_mrckl_loss_mean"])
    # The loss is ~5e-4: also hold it to a relative tolerance.
    np.testing.assert_allclose(kl, io["pre_mrckl_loss_mean"], rtol=1e-4)


def test_pretrain_cmr_loss(converted, ldot_io):
    """The pre-training checkpoint's dual encoder gives the CMR loss of the original."""
    model, params = ldot_jax.load_dual_encoder(converted["lightningdot_pretrain"])
    io = ldot_io
    text = model.apply({"params": params}, text_of(io), method=model.encode_text)
    image = model.apply({"params": params}, image_of(io), method=model.encode_image)
    assert_close(losses.contrastive_loss_per_example(text, image),
                 io["pre_cmr_loss_per_example"])
    assert_close(losses.reference_contrastive_loss(text, image), io["pre_cmr_loss_mean"])
