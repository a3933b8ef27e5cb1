"""Hard negatives mined from the index over a whole split: the mining against a brute-force
NumPy reference, the file's round trip and its errors, and training batches built from it
(anchors followed by their mined images, the same global batch for any process count)."""

import numpy as np
import pytest

from ldot_jax.data import mined_negatives, pipeline, scenes
from ldot_jax.data.tokenizer import Tokenizer
from ldot_jax.training import mine
from conftest import flat


def _brute_force(image_vectors, text_vectors, caption_image, k):
    scores = text_vectors.astype(np.float64) @ image_vectors.T.astype(np.float64)
    n = len(image_vectors)
    out = np.full((n, k), -1, np.int32)
    for i in range(n):
        mine_rows = caption_image == i
        if not mine_rows.any():
            continue
        best = scores[mine_rows].max(axis=0)
        best[i] = -np.inf
        order = np.lexsort((np.arange(n), -best))  # best first, ties to the smaller id
        order = [j for j in order if j != i][:k]
        out[i, :len(order)] = order
    return out


def test_mining_matches_numpy_and_never_returns_the_image_itself():
    rng = np.random.default_rng(0)
    images = rng.normal(size=(40, 8)).astype(np.float32)
    caption_image = np.repeat(np.arange(40), rng.integers(1, 5, size=40))
    texts = (images[caption_image] + rng.normal(size=(len(caption_image), 8))).astype(np.float32)
    for k in (1, 5):
        got = mine.mine_negatives(images, texts, caption_image, k)
        np.testing.assert_array_equal(got, _brute_force(images, texts, caption_image, k))
        assert not (got == np.arange(40)[:, None]).any()
        assert (got >= 0).all()


def test_from_ranked_keeps_each_candidate_once_at_its_best_score_and_pads():
    # Image 0 has two captions; image 1 one; image 2 none.
    caption_image = np.array([0, 0, 1])
    ranked = np.array([[0, 1, 3], [3, 0, 1], [1, 0, -1]])
    scores = np.array([[0.9, 0.5, 0.4], [0.8, 0.7, 0.6], [0.9, 0.2, -np.inf]])
    got = mined_negatives.from_ranked(caption_image, ranked, scores, 4, 3)
    np.testing.assert_array_equal(got, [[3, 1, -1], [0, -1, -1], [-1, -1, -1],
                                        [-1, -1, -1]])


def test_file_round_trip_and_errors(tmp_path):
    negatives = np.array([[1, 2], [2, -1], [0, 1]], np.int32)
    path = mined_negatives.write(tmp_path / "m.npz", negatives, {"split": "train"})
    got, meta = mined_negatives.read(path, 3)
    np.testing.assert_array_equal(got, negatives)
    assert meta == {"split": "train"}
    assert [p.name for p in tmp_path.iterdir()] == ["m.npz"]  # no temporary left behind
    with pytest.raises(ValueError, match="mined for 3 images, the training split has 4"):
        mined_negatives.read(path, 4)
    with pytest.raises(FileNotFoundError, match="missing.npz does not exist"):
        mined_negatives.read(tmp_path / "missing.npz", 3)
    mined_negatives.write(tmp_path / "own.npz", np.array([[1], [1]]), {})
    with pytest.raises(ValueError, match="lists image 1 as its own negative"):
        mined_negatives.read(tmp_path / "own.npz", 2)
    mined_negatives.write(tmp_path / "range.npz", np.array([[5], [0]]), {})
    with pytest.raises(ValueError, match=r"image ids in \[0, 5\]"):
        mined_negatives.read(tmp_path / "range.npz", 2)
    np.savez(tmp_path / "other.npz", x=np.zeros(2))
    with pytest.raises(ValueError, match="lacks"):
        mined_negatives.read(tmp_path / "other.npz", 2)


def test_composer_follows_each_anchor_with_captions_of_its_mined_images():
    caption_image = np.array([0, 0, 1, 1, 2, 3, 3])  # image 4 has no caption
    negatives = np.array([[1, 4, -1], [0, 2, 3], [-1, -1, -1], [4, 4, -1], [0, -1, -1]])
    composer = mined_negatives.BatchComposer(caption_image, negatives, 2)
    rng = np.random.default_rng(0)
    for _ in range(20):
        anchors = rng.choice(len(caption_image), size=3, replace=False)
        rows = composer(anchors, rng).reshape(3, 3)
        np.testing.assert_array_equal(rows[:, 0], anchors)
        for anchor, *mined in rows:
            own = caption_image[anchor]
            mined_images = caption_image[mined]
            assert (mined_images != own).all()
            if own == 0:  # only image 1 is minable (4 has no caption)
                assert (mined_images == 1).all()
            elif own == 1:  # two draws without replacement from {0, 2, 3}
                assert len(set(mined_images)) == 2 and set(mined_images) <= {0, 2, 3}
            elif own == 3:  # nothing usable: random other images with captions
                assert set(mined_images) <= {0, 1, 2}
    again = mined_negatives.BatchComposer(caption_image, negatives, 2)
    np.testing.assert_array_equal(again(np.array([0, 2]), np.random.default_rng(5)),
                                  composer(np.array([0, 2]), np.random.default_rng(5)))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    images = scenes.generate_chunk((3, "train", 0, 30, scenes.ScenesConfig(feat_dim=32), 0))
    tokenizer = Tokenizer.train((c for r in images for c in r["captions"]), 300)
    index = pipeline.tokenize_captions(images, tokenizer, 22, "drop")
    rng = np.random.default_rng(1)
    negatives = np.stack([rng.choice([j for j in range(30) if j != i], 4, replace=False)
                          for i in range(30)])
    path = mined_negatives.write(tmp_path_factory.mktemp("mined") / "m.npz", negatives, {})
    return images, tokenizer, index, negatives, str(path)


def _config(path, **kw):
    return pipeline.PipelineConfig(**{**dict(
        batch_size=12, text_buckets=(8, 12, 16, 24), region_buckets=(4, 6, 8), max_text_len=22,
        num_threads=1, mined_negatives=path, mined_per_anchor=2), **kw})


def test_training_batches_hold_anchors_and_their_mined_images(data):
    images, tokenizer, index, negatives, path = data
    config = _config(path)
    batches = iter(pipeline.training_dataset(images, index, tokenizer, config))
    for _ in range(pipeline.steps_per_epoch(index, config)):
        rows = next(batches)["image_index"].reshape(4, 3)
        for anchor, *mined in rows:
            assert set(mined) <= set(negatives[anchor]) and len(set(mined)) == 2
    # One epoch: every anchor slot filled, as many anchors as captions (less the remainder).
    assert pipeline.steps_per_epoch(index, config) == len(index) // 4
    with pytest.raises(ValueError, match="batch_size=10 is not a multiple of 1 \\+ "
                                         "pipeline.mined_per_anchor=2"):
        _config(path, batch_size=10)


def test_mined_batches_are_the_same_for_any_process_count(data):
    images, tokenizer, index, _, path = data
    single = iter(pipeline.training_dataset(images, index, tokenizer, _config(path, seed=3)))
    shards = [iter(pipeline.training_dataset(images, index, tokenizer, _config(path, seed=3),
                                             p, 3)) for p in range(3)]
    for _ in range(4):
        whole = next(single)
        parts = [next(s) for s in shards]
        for key, value in flat(whole).items():
            for p, part in enumerate(parts):
                np.testing.assert_array_equal(flat(part)[key], value[p::3], err_msg=key)
