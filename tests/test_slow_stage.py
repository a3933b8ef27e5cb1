"""The slow stage's training and evaluation pieces: hard negatives never return a positive and
follow the softmax of the dual scores, on any number of devices; the distillation, ITM and
rank-hinge losses against NumPy; the itm and distill tasks give the same loss and gradient on
8 devices as on one; recall from ranked lists against a brute-force NumPy reference with
several captions per image and ties; re-ranking every candidate equals the exact ranking."""

import jax
import numpy as np
import pytest

from ldot_jax.checkpoints import kinds
from ldot_jax.checkpoints import pretrained
from ldot_jax.core import parallel
from ldot_jax.evaluation import ranked_lists, recall
from ldot_jax.models.config import (CrossEncoderConfig, DualEncoderConfig, RegionConfig,
                                    TransformerConfig)
from ldot_jax.training import hard_negatives, losses, tasks

# ---------------------------------------------------------------------------------------------
# Hard negatives


def _groups(b=16, seed=0):
    """Batch rows whose image ids repeat (several captions of one image in a batch)."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, b // 2, b).astype(np.int32)


def test_sampling_never_returns_a_positive_and_follows_the_softmax():
    b, draws = 8, 4000
    group = np.array([0, 0, 1, 2, 2, 2, 3, 4], np.int32)
    valid = np.array([1, 1, 1, 1, 1, 1, 1, 0], bool)
    scores = np.random.default_rng(1).normal(size=(b, b)).astype(np.float32)
    keys = jax.random.split(jax.random.key(0), draws)
    sample = jax.jit(jax.vmap(lambda k: hard_negatives.sample(
        scores, group, group, valid, jax.random.gumbel(k, (b, b)), 0.5, 1)))
    index, found = (np.asarray(x)[:, :, 0] for x in sample(keys))
    assert found.all()  # every row has another image among the valid keys
    assert not (group[index] == group[None, :]).any()  # never the query's own image
    assert not (~valid[index]).any()  # never a padding row
    # The empirical distribution of row 0 against softmax(score / T) over the allowed keys.
    allowed = (group != group[0]) & valid
    p = np.where(allowed, np.exp(scores[0] / 0.5), 0.0)
    p /= p.sum()
    freq = np.bincount(index[:, 0], minlength=b) / draws
    np.testing.assert_allclose(freq, p, atol=0.03)


def test_k_draws_are_distinct_and_missing_draws_are_flagged():
    group = np.array([0, 0, 0, 1], np.int32)
    valid = np.ones(4, bool)
    noise = np.zeros((4, 4), np.float32)
    index, found = hard_negatives.sample(np.zeros((4, 4), np.float32), group, group, valid,
                                         noise, 1.0, 2)
    index, found = np.asarray(index), np.asarray(found)
    # Rows of image 0 have one other-image key (row 3); their second draw is missing.
    np.testing.assert_array_equal(found[:3], [[True, False]] * 3)
    np.testing.assert_array_equal(index[:3, 0], [3, 3, 3])
    assert found[3].all() and len(set(index[3])) == 2 and 3 not in index[3]


def test_mining_on_8_devices_equals_one_device_and_gathers_rows():
    b, d = 16, 6
    rng = np.random.default_rng(2)
    text, image = (rng.normal(size=(b, d)).astype(np.float32) for _ in range(2))
    group, valid = _groups(b), np.arange(b) < 14
    key = jax.random.key(3)
    one = hard_negatives.draw(None, text, image, group, valid, key, 1.0, 3)
    mesh = parallel.make_mesh()
    with jax.set_mesh(mesh):
        args = parallel.global_batch({"t": text, "i": image, "g": group, "v": valid}, mesh)
        eight = jax.jit(lambda a: hard_negatives.draw(mesh, a["t"], a["i"], a["g"], a["v"],
                                                      key, 1.0, 3))(args)
        gathered = jax.jit(lambda a, idx: hard_negatives.gather(mesh, a["i"], idx))(
            args, jax.device_put(eight[0], parallel.batch_sharding(mesh)))
    for x, y in zip(one, eight):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    index, found = np.asarray(one[0]), np.asarray(one[1])
    assert not found[~valid].any()
    assert not ((group[index] == group[:, None]) & found).any()
    np.testing.assert_array_equal(np.asarray(gathered), image[index])


# ---------------------------------------------------------------------------------------------
# Losses against NumPy


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_distillation_loss_matches_numpy():
    rng = np.random.default_rng(4)
    student, teacher = rng.normal(size=(2, 5, 6)).astype(np.float32) * 3
    mask = rng.uniform(size=(5, 6)) < 0.7
    mask[:, 0] = True
    mask[4] = [True, False, False, False, False, False]  # one candidate: no distribution
    for t in (1.0, 2.5):
        got = np.asarray(losses.distillation_loss_per_row(student, teacher, mask, t))
        for q in range(5):
            s, u = student[q][mask[q]] / t, teacher[q][mask[q]] / t
            p, log_p, log_q = np.exp(_log_softmax(u)), _log_softmax(u), _log_softmax(s)
            want = 0.0 if mask[q].sum() < 2 else np.sum(p * (log_p - log_q)) * t * t
            np.testing.assert_allclose(got[q], want, rtol=1e-5, atol=1e-6)
    # No gradient reaches the teacher; the student's gradient is p_s - p_t (T = 1).
    grad_t = jax.grad(lambda x: losses.distillation_loss_per_row(student, x, mask, 1.0).sum())(
        teacher)
    assert not np.asarray(grad_t).any()
    grad_s = np.asarray(jax.grad(lambda x: losses.distillation_loss_per_row(
        x, teacher, mask, 1.0)[0])(student))[0]
    p_s = np.exp(_log_softmax(student[0][mask[0]]))
    p_t = np.exp(_log_softmax(teacher[0][mask[0]]))
    np.testing.assert_allclose(grad_s[mask[0]], p_s - p_t, atol=1e-6)


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def test_itm_rank_hinge_and_listwise_losses_match_numpy():
    rng = np.random.default_rng(5)
    logits = rng.normal(size=(6, 2)).astype(np.float32)
    labels = np.array([1, 0, 0, 1, 0, 1])
    weights = np.array([1, 1, 0, 1, 1, 0], np.float32)
    nll = -_log_softmax(logits)[np.arange(6), labels]
    np.testing.assert_allclose(losses.itm_loss(logits, labels, weights),
                               np.sum(nll * weights) / weights.sum(), rtol=1e-6)
    pos, neg = rng.normal(size=(2, 6)).astype(np.float32) * 2.0
    # UNITER's hinge is on the sigmoid of the rank logits.
    hinge = np.maximum(0.0, 0.2 - _sigmoid(pos) + _sigmoid(neg))
    np.testing.assert_allclose(losses.rank_hinge_loss(pos, neg, weights, 0.2),
                               np.sum(hinge * weights) / weights.sum(), rtol=1e-6)
    # k = 3 negatives per positive, some not drawn; row 2 has none, row 4 is invalid.
    negs = rng.normal(size=(6, 3)).astype(np.float32) * 2.0
    found = np.ones((6, 3), bool)
    found[0, 1] = found[3, :2] = False
    found[2] = False
    valid = np.array([1, 1, 1, 1, 0, 1], bool)
    hinge = np.maximum(0.0, 0.2 - _sigmoid(pos)[:, None] + _sigmoid(negs))
    np.testing.assert_allclose(losses.rank_hinge_loss(pos, negs, found, 0.2),
                               hinge[found].mean(), rtol=1e-6)
    expected = []
    for i in range(6):
        if valid[i] and found[i].any():
            row = np.concatenate([[pos[i]], negs[i][found[i]]])
            expected.append(-_log_softmax(row[None])[0, 0])
    np.testing.assert_allclose(losses.listwise_rank_loss(pos, negs, found, valid),
                               np.mean(expected), rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# The itm and distill tasks: the same on 8 devices as on one


def _tiny_transformer():
    return TransformerConfig(vocab_size=64, hidden_size=16, num_layers=1, num_heads=2,
                             intermediate_size=32, max_position_embeddings=32,
                             hidden_dropout=0.0, attention_dropout=0.0)


def _random_params(kind, config, seed):
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        noise = rng.normal(0.0, 0.2, leaf.shape).astype(np.float32)
        return 1.0 + noise / 2 if "scale" in jax.tree_util.keystr(path) else noise
    return jax.tree.map_with_path(draw, pretrained.abstract_params(kind, config))


@pytest.fixture(scope="module")
def slow_models():
    region = RegionConfig(feat_dim=8, box_dim=7, num_classes=5)
    dual_cfg = DualEncoderConfig(_tiny_transformer(), _tiny_transformer(), region,
                                 project_dim=8, cls_token_id=2)
    cross_cfg = CrossEncoderConfig(_tiny_transformer(), region)
    b, length, regions = 16, 6, 4
    rng = np.random.default_rng(6)
    lengths = rng.integers(3, length + 1, b)
    batch = {"text": {"input_ids": rng.integers(3, 64, (b, length)).astype(np.int32),
                      "attention_mask": (np.arange(length)[None] < lengths[:, None]
                                         ).astype(np.int32)},
             "image": {"region_feat": rng.normal(size=(b, regions, 8)).astype(np.float32),
                       "boxes": rng.uniform(size=(b, regions, 7)).astype(np.float32),
                       "region_mask": np.ones((b, regions), np.int32)},
             "image_index": _groups(b, 7), "valid": np.arange(b) < 15}
    batch["text"]["input_ids"][:, 0] = 2
    return {"dual": (pretrained.build_model("lightningdot", dual_cfg),
                     _random_params("lightningdot", dual_cfg, 8)),
            "cross": (pretrained.build_model("uniter_itm", cross_cfg),
                      _random_params("uniter_itm", cross_cfg, 9)),
            "batch": batch}


@pytest.mark.parametrize("variant", ["itm", "itm_listwise", "distill", "distill_residual"])
def test_slow_tasks_equal_on_8_devices_and_one(slow_models, variant):
    dual, dual_params = slow_models["dual"]
    cross, cross_params = slow_models["cross"]
    task = variant.split("_")[0]
    if variant == "itm":
        model, params = cross, {"model": cross_params, "dual": dual_params}
        extra = {"frozen": {"dual": dual}}
    elif variant == "itm_listwise":  # 3 negatives per positive, all three losses, residual
        model, params = cross, {"model": cross_params, "dual": dual_params}
        extra = {"frozen": {"dual": dual}, "configs": {"itm": tasks.ItmConfig(
            negatives=3, list_weight=1.0, residual_scale=5.0)}}
    else:
        model, params = dual, {"model": dual_params, "teacher": cross_params}
        extra = {"frozen": {"teacher": cross}, "configs": {"distill": tasks.DistillConfig(
            candidates=4, residual=variant == "distill_residual")}}
    fn = tasks.get(task).loss
    key = jax.random.key(10)
    results = []
    for mesh in (None, parallel.make_mesh()):
        setup = tasks.TaskSetup(model, mesh, **extra)

        def loss(p, batch):
            value, metrics = fn({**params, "model": p}, batch, key, setup)
            return value, metrics
        step = jax.jit(jax.value_and_grad(loss, has_aux=True))
        if mesh is None:
            results.append(step(params["model"], slow_models["batch"]))
        else:
            with jax.set_mesh(mesh):
                results.append(step(parallel.replicate(params["model"], mesh),
                                    parallel.global_batch(slow_models["batch"], mesh)))
    (one, one_metrics), one_grad = results[0]
    (eight, eight_metrics), eight_grad = results[1]
    assert np.isfinite(float(one)) and float(one) > 0
    np.testing.assert_allclose(float(eight), float(one), rtol=1e-5)
    for k in one_metrics:
        np.testing.assert_allclose(float(eight_metrics[k]), float(one_metrics[k]), rtol=1e-4,
                                   atol=1e-6, err_msg=k)
    flat_one = jax.tree.leaves(one_grad)
    assert any(np.abs(np.asarray(g)).max() > 0 for g in flat_one)
    for a, b in zip(flat_one, jax.tree.leaves(eight_grad)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6)
    if task == "distill":
        assert float(one_metrics["distill_loss"]) > 0
    if variant == "itm_listwise":
        assert float(one_metrics["list_loss"]) > 0


def test_residual_distillation_adds_the_teachers_correction(slow_models):
    """distill.residual: the teacher's target is the student's own score + the cross score,
    so a teacher whose score is the same for every pair asks for no change (KL 0), and the
    plain teacher (its constant alone, a uniform target) for one."""
    dual, dual_params = slow_models["dual"]
    cross, cross_params = slow_models["cross"]
    flat = jax.tree.map(np.asarray, cross_params)
    flat["rank_output"] = jax.tree.map(np.zeros_like, flat["rank_output"])
    params = {"model": dual_params, "teacher": flat}
    out = {}
    for residual in (False, True):
        setup = tasks.TaskSetup(dual, None, frozen={"teacher": cross}, configs={
            "distill": tasks.DistillConfig(candidates=4, residual=residual)})
        _, metrics = tasks.get("distill").loss(params, slow_models["batch"],
                                               jax.random.key(3), setup)
        out[residual] = float(metrics["distill_loss"])
    assert abs(out[True]) < 1e-6 and out[False] > 1e-3


def test_slow_tasks_refuse_the_wrong_model(slow_models):
    dual, dual_params = slow_models["dual"]
    with pytest.raises(ValueError, match="uniter_itm"):
        tasks.get("itm").loss({"model": dual_params}, slow_models["batch"],
                              jax.random.key(0), tasks.TaskSetup(dual, None))
    with pytest.raises(ValueError, match="teacher"):
        tasks.get("distill").loss({"model": dual_params}, slow_models["batch"],
                                  jax.random.key(0), tasks.TaskSetup(dual, None))
    with pytest.raises(ValueError, match="cannot train model kind"):
        kinds.check_tasks("uniter_itm", ("cmr",))


# ---------------------------------------------------------------------------------------------
# Recall from ranked lists


def _brute_force(scores, caption_image, ks=(1, 5, 10)):
    """IR / TR recall by definition, one query at a time, ties to the smaller index."""
    t, n = scores.shape
    out = {}
    for k in ks:
        hits = 0
        for q in range(t):
            order = sorted(range(n), key=lambda i: (-scores[q, i], i))
            hits += caption_image[q] in order[:k]
        out[f"ir_r{k}"] = 100.0 * hits / t
        hits = 0
        for i in range(n):
            order = sorted(range(t), key=lambda c: (-scores[c, i], c))
            hits += any(caption_image[c] == i for c in order[:k])
        out[f"tr_r{k}"] = 100.0 * hits / n
    return out


def _ranked(scores, k):
    """Top-k ids per row, ties to the smaller index (what ExactIndex returns)."""
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


@pytest.mark.parametrize("seed", [0, 1])
def test_recall_from_lists_matches_brute_force_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = 30
    caption_image = np.repeat(np.arange(n), rng.integers(1, 6, n))  # 1–5 captions per image
    # Integer scores from a small range: many ties, inside and across images.
    scores = rng.integers(0, 6, (len(caption_image), n)).astype(np.float32)
    want = _brute_force(scores, caption_image)
    for k in (10, 17):
        ir = ranked_lists.list_ranks_text_to_image(_ranked(scores, k), caption_image)
        tr = ranked_lists.list_ranks_image_to_text(_ranked(scores.T, k), np.arange(n),
                                                   caption_image)
        got = ranked_lists.metrics_from_ranks(ir, tr, k)
        for key, value in want.items():
            assert got[key] == pytest.approx(value), (key, k)
        assert got["ar"] == pytest.approx(np.mean(list(want.values())))
    # The same numbers as recall.py's block-wise ranks over the full score matrix.
    full_ir = recall.recall_at_k(np.minimum(
        recall._rank_of(scores, caption_image), 10))
    for k, v in full_ir.items():
        assert v == pytest.approx(want[f"ir_r{k}"])
    with pytest.raises(ValueError, match="lists of ≥ 10"):
        ranked_lists.metrics_from_ranks(ir, tr, 5)


def test_reranking_every_candidate_equals_the_exact_ranking():
    rng = np.random.default_rng(3)
    q, n = 7, 12
    dot = rng.normal(size=(q, n)).astype(np.float32)
    ids = _ranked(dot, n)
    dot_sorted = np.take_along_axis(dot, ids, 1)
    exact = rng.integers(0, 4, (q, n)).astype(np.float32)  # the cross-encoder, with ties
    cross = np.take_along_axis(exact, ids, 1)
    got = ranked_lists.rerank_lists(ids, dot_sorted, cross, n)
    # Exact: by cross score, ties in dot order.
    want = np.array([sorted(ids[r], key=lambda i: (-exact[r, i], list(ids[r]).index(i)))
                     for r in range(q)])
    np.testing.assert_array_equal(got, want)
    # M < k: only the head moves; -1 candidates go last.
    ids[:, 2] = -1
    head = ranked_lists.rerank_lists(ids, dot_sorted, cross, 5)
    np.testing.assert_array_equal(head[:, 5:], ids[:, 5:])
    assert (head[:, 4] == -1).all()
