"""Caption-true recall on the scenes: the caption grammar's own judgement of which captions
are true of which scenes (data/scenes_truth.py), and the metric against a NumPy brute force,
from embeddings and from ranked lists."""

import numpy as np
import pytest

from ldot_jax.data import scenes
from ldot_jax.data import scenes_truth as st
from ldot_jax.evaluation import ranked_lists, recall


def _object(shape, color, x, y, size="small"):
    return scenes.SceneObject(shape, color, size, x, y, 0.08 if size == "small" else 0.15)


@pytest.mark.parametrize("split,seed", [("train", 0), ("test", 3)])
def test_every_generated_caption_parses_and_is_true_of_its_scene(split, seed):
    config = scenes.ScenesConfig()
    count = 400
    objects = [scenes.scene_objects(seed, split, i, config)[0] for i in range(count)]
    twins = [i for i in range(count) if scenes.scene_objects(seed, split, i, config)[1]]
    captions = [scenes.scene_captions(seed, split, i, config, objects[i]) for i in range(count)]
    flat = [c for per in captions for c in per]
    truth = st.truth(flat, objects)
    owner = np.repeat(np.arange(count), config.captions_per_image)
    assert truth[np.arange(len(flat)), owner].all()
    # Captions fit several scenes, but far from all; a hard twin fails some of its original's.
    assert 1.5 < truth.sum(1).mean() < 0.1 * count
    assert len(twins) > 20
    false_of_twin = [not truth[t, i] for i in twins for t in np.nonzero(owner == i - 1)[0]]
    assert 0.2 < np.mean(false_of_twin) < 0.9


def test_readings_by_hand():
    red_left = [_object("circle", "red", 0.2, 0.5), _object("square", "blue", 0.8, 0.5, "large")]
    swapped = [_object("circle", "red", 0.8, 0.5), _object("square", "blue", 0.2, 0.5, "large")]
    rebound = [_object("circle", "blue", 0.2, 0.5), _object("square", "red", 0.8, 0.5, "large")]
    holds = lambda text, scene: st.parse(text).holds(scene)
    text = "a small red circle to the left of a big blue box"
    assert holds(text, red_left) and not holds(text, swapped) and not holds(text, rebound)
    assert not holds("a large red circle left of a blue square", red_left)  # size differs
    assert holds("a blue block on a dark background", red_left)
    assert not holds("a green block in the scene", red_left)
    # Count captions list every (colour, shape) group with its count.
    assert holds("a red circle and a blue square", red_left)
    assert not holds("a red circle and a blue square", red_left + [_object("star", "red", .5, .1)])
    two = [_object("triangle", "green", 0.2, 0.2), _object("triangle", "green", 0.8, 0.8)]
    assert holds("there are two green triangles", two)
    assert not holds("there are two green triangles", two[:1])
    assert not holds("there is a green triangle", two)
    # "a red circle" is also a partial caption: true of any scene with one.
    assert holds("a red circle", red_left)
    assert holds("two objects colored blue and red", red_left)
    assert not holds("two objects colored blue and red", rebound + two)
    assert not holds("two objects colored red", red_left)
    for text in ("a red hexagon", "three purple circles left of", "a dog on a sofa", ""):
        with pytest.raises(ValueError, match="not one the generator writes"):
            st.parse(text)


def _brute(text, image, truth, k):
    ir, tr = [], []
    for t in range(len(text)):
        order = sorted(range(len(image)), key=lambda n: (-float(text[t] @ image[n]), n))[:k]
        ir.append(next((r for r, n in enumerate(order) if truth[t, n]), k))
    for n in range(len(image)):
        order = sorted(range(len(text)), key=lambda t: (-float(text[t] @ image[n]), t))[:k]
        tr.append(next((r for r, t in enumerate(order) if truth[t, n]), k))
    return np.array(ir), np.array(tr)


@pytest.mark.parametrize("seed", [0, 1])
def test_caption_true_ranks_equal_a_brute_force(seed):
    rng = np.random.default_rng(seed)
    text = rng.normal(size=(37, 6)).astype(np.float32)
    image = rng.normal(size=(23, 6)).astype(np.float32)
    # Ties on purpose: repeated vectors rank by index.
    image[5] = image[2]
    text[9] = text[4]
    truth = rng.random((37, 23)) < 0.08
    truth[3] = False  # a caption true of nothing never hits
    ir, tr = recall.caption_true_ranks(text, image, truth, 10, block=7)
    want_ir, want_tr = _brute(text, image, truth, 10)
    np.testing.assert_array_equal(ir, want_ir)
    np.testing.assert_array_equal(tr, want_tr)
    assert ir[3] == 10
    # From ranked lists (what the two-stage report has): the same ranks.
    queries, images = np.arange(5, 30), np.arange(3, 20)
    ir_ids = np.argsort(-(text[queries] @ image.T), axis=1, kind="stable")[:, :10]
    tr_ids = np.argsort(-(image[images] @ text.T), axis=1, kind="stable")[:, :10]
    tr_ids[0, 8:] = -1  # padding ids never hit
    lists = ranked_lists.caption_true_list_ranks(ir_ids, queries, tr_ids, images, truth)
    np.testing.assert_array_equal(lists[0], want_ir[queries])
    np.testing.assert_array_equal(lists[1][1:], want_tr[images][1:])
    metrics = recall.caption_true_metrics(ir, tr)
    assert metrics["ct_ir_r1"] == pytest.approx(100 * np.mean(want_ir < 1))
    assert metrics["ct_ar"] == pytest.approx(np.mean([metrics[f"ct_{d}_r{k}"]
                                                      for d in ("ir", "tr") for k in (1, 5, 10)]))
    # Caption-true recall is never below the one-image recall (its own image is true).
    owner = rng.integers(0, 23, 37)
    truth[np.arange(37), owner] = True
    full = recall.retrieval_metrics(text, image, owner, truth=truth)
    assert all(full[f"ct_{m}"] >= full[m] for m in ("ir_r1", "ir_r5", "tr_r1", "ar"))
    with pytest.raises(ValueError, match=r"caption truth of shape \(37, 22\)"):
        recall.caption_true_ranks(text, image, truth[:, :22], 10)


def test_caption_kinds_name_the_maker():
    """Each caption maker's captions get its kind ("a red circle", both a partial caption and
    a one-group count, is "partial")."""
    rng = np.random.default_rng(0)
    makers = {"relation": scenes._relation_caption, "count": scenes._count_caption,
              "partial": scenes._partial_caption, "count_all": scenes._count_all_caption}
    config = scenes.ScenesConfig()
    for i in range(200):
        objects = scenes.scene_objects(0, "train", i, config)[0]
        for kind, make in makers.items():
            text = make(objects, rng)
            if text is None:
                continue
            one_object = kind == "count" and len(objects) == 1 and not text.startswith("there")
            assert st.parse(text).kind == ("partial" if one_object else kind), text
    assert list(st.kinds(["a red circle", "two red circles", "a red circle and a blue box",
                          "one object colored red", "a red circle over a blue box"])) == [
        "partial", "count", "count", "count_all", "relation"]
    assert set(st.KINDS) == {"partial", "count", "count_all", "relation"}


def test_caption_true_recall_by_kind():
    ir = np.array([0, 3, 10, 0, 0, 7, 1])
    kinds = np.array(["relation", "relation", "partial", "count", "relation", "partial",
                      "count"])
    by = recall.caption_true_by_kind(ir, kinds, st.KINDS)
    assert by["ct_ir_r1_relation"] == pytest.approx(200 / 3)
    assert by["ct_ir_r5_relation"] == pytest.approx(100.0)
    assert by["ct_ir_r10_partial"] == pytest.approx(50.0)
    assert by["ct_ir_r1_count"] == pytest.approx(50.0)
    assert not any(key.endswith("_count_all") for key in by)  # no caption of that kind
    # The kinds' recalls weighted by their captions are the overall one.
    counts = {k: int((kinds == k).sum()) for k in ("relation", "partial", "count")}
    overall = sum(by[f"ct_ir_r1_{k}"] * n for k, n in counts.items()) / len(ir)
    assert overall == pytest.approx(recall.recall_at_k(ir)[1])
    with pytest.raises(ValueError, match=r"caption kinds \['dog'\]"):
        recall.caption_true_by_kind(ir, np.array(["dog"] * 7), st.KINDS)
    with pytest.raises(ValueError, match="3 caption kinds for 7"):
        recall.caption_true_by_kind(ir, kinds[:3], st.KINDS)


def test_kinds_without_truth_are_refused():
    # Per-kind recall is caption-true recall: kinds alone must not be dropped in silence.
    rng = np.random.default_rng(0)
    text, image = rng.normal(size=(4, 3)), rng.normal(size=(2, 3))
    with pytest.raises(ValueError, match="kinds given without truth"):
        recall.retrieval_metrics(text, image, np.array([0, 0, 1, 1]),
                                 kinds=np.array(["partial"] * 4), kind_names=st.KINDS)
