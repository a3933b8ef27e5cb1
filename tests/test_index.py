"""The fast-stage indexes: exact search against NumPy (8 devices and 1), ScaNN and
coarse-to-fine recall against exact search on a fixed clustered set, ids after add / delete,
save / load round trips, and the errors for bad input (dimension, fingerprint, partial files)."""

import json
import os

import jax
import numpy as np
import pytest

from ldot_jax import index as ix
from ldot_jax.bench import vectors
from ldot_jax.index import base, exact, scann_index

DIM = 64


@pytest.fixture(scope="module")
def clustered():
    """4,000 database vectors and 200 queries of the documented clustered set."""
    return vectors.clustered(4000, DIM, 200, seed=0)


def _ids(n, seed=1):
    # Sparse, shuffled ids: a result that returned row numbers instead would fail.
    return np.random.default_rng(seed).permutation(n * 7)[:n].astype(np.int64) + 3


def test_exact_search_equals_numpy_on_8_devices_and_on_1():
    rng = np.random.default_rng(0)
    db = rng.standard_normal((1003, 24)).astype(np.float32)
    db[500] = db[20]  # an exact tie: the smaller row (20) must come first
    queries = rng.standard_normal((37, 24)).astype(np.float32)
    queries[0] = db[20]
    ids = _ids(len(db))
    rows, scores = ix.numpy_top_k(queries, db, 15)
    assert jax.device_count() == 8
    for devices, chunk in ((None, 64), (jax.devices()[:1], 100), (None, None)):
        index = ix.ExactIndex(24, chunk_size=chunk, query_batch=16, devices=devices)
        result = index.add(db, ids).search(queries, 15)
        np.testing.assert_array_equal(result.ids, ids[rows])
        np.testing.assert_allclose(result.scores, scores, rtol=1e-5, atol=1e-5)
    assert list(result.ids[0, :2]) == [ids[20], ids[500]]


@pytest.mark.parametrize("columns, k", [(1024, 10), (4096, 100), (1000, 7), (2048, 1),
                                        (512, 200), (65536, 10)])
def test_chunk_top_k_equals_lax_top_k_with_ties(columns, k):
    # About 2 · columns / k distinct values: each of the k best has ~k / 2 ties, inside and
    # across blocks, and blocks whose maxima differ (so the best blocks come out of column
    # order). The two-level selection must return the same columns in the same order.
    assert (exact.block_width(columns, k) is None) == ((columns, k) in ((1000, 7), (512, 200)))
    rng = np.random.default_rng(columns + k)
    scores = rng.integers(0, 2 * columns // k, (9, columns)).astype(np.float32)
    top, cols = exact.chunk_top_k(jax.numpy.asarray(scores), k)
    want_top, want_cols = jax.lax.top_k(scores, k)
    np.testing.assert_array_equal(cols, want_cols)
    np.testing.assert_array_equal(top, want_top)


@pytest.mark.parametrize("devices, k", [(8, 10), (3, 20), (1, 10)])
def test_exact_search_with_ties_across_chunks_and_devices(devices, k):
    # Integer vectors: exact scores and many ties, which must go to the smaller row across
    # blocks, chunks (the last one overlapping its predecessor) and devices.
    rng = np.random.default_rng(devices)
    db = rng.integers(-2, 3, (9001, 8)).astype(np.float32)
    queries = rng.integers(-2, 3, (21, 8)).astype(np.float32)
    # For the last queries, all of the k best lie in one chunk (rows 5000 to 5063).
    queries[-5:] = np.abs(queries[-5:]) + 1
    db[5000:5064] = rng.integers(3, 5, (64, 8))
    ids = _ids(len(db))
    index = ix.ExactIndex(8, chunk_size=1024, devices=jax.devices()[:devices]).add(db, ids)
    assert exact.block_width(1024, k) is not None  # the two-level selection runs
    result = index.search(queries, k)
    rows, scores = ix.numpy_top_k(queries, db, k)
    np.testing.assert_array_equal(result.ids, ids[rows])
    np.testing.assert_array_equal(result.scores, scores)


def test_exact_search_of_a_corpus_smaller_than_the_device_count():
    db = np.eye(3, 8, dtype=np.float32) * np.array([[1.0], [3.0], [2.0]], np.float32)
    result = ix.ExactIndex(8).add(db, [10, 11, 12]).search(np.ones(8, np.float32), 3)
    assert result.ids.tolist() == [[11, 12, 10]]
    np.testing.assert_allclose(result.scores, [[3.0, 2.0, 1.0]])


def test_scann_and_coarse_to_fine_recall_against_exact(clustered):
    db, queries = clustered
    ids = _ids(len(db))
    exact = ix.ExactIndex(DIM).add(db, ids)
    # Below 20k vectors the rule picks brute force: exact results.
    brute = ix.ScannIndex(DIM).add(db, ids)
    assert not brute.scann_params.hashing and brute.scann_params.num_leaves == 0
    np.testing.assert_array_equal(brute.search(queries, 10).ids, exact.search(queries, 10).ids)
    # Forced partitioning + hashing, as the rule gives from 100k vectors.
    tree = ix.ScannIndex(DIM, num_leaves=64, leaves_to_search=16, hashing=True).add(db, ids)
    health = ix.recall_against_exact(tree, exact, queries)
    assert health["recall@10"] >= 0.9, health
    # Coarse stage on the first 16 of 64 dimensions, full-dimension rescoring of 100.
    for normalize_prefix in (False, True):
        hier = ix.HierarchicalIndex(DIM, d_low=16, candidates=100,
                                    normalize_prefix=normalize_prefix).add(db, ids)
        health = ix.recall_against_exact(hier, exact, queries, ks=(1, 10))
        assert health["recall@10"] >= 0.9, (normalize_prefix, health)
        # All candidates re-scored exactly: the exact top-k.
        everything = hier.search(queries[:5], 10, candidates=len(db))
        np.testing.assert_array_equal(everything.ids, exact.search(queries[:5], 10).ids)
    # Fewer candidates, lower recall: the option reaches the search.
    few = ix.recall_against_exact(hier, exact, queries, ks=(10,), candidates=10)
    assert few["recall@10"] < health["recall@10"]


@pytest.mark.parametrize("make", [
    lambda: ix.ExactIndex(DIM),
    lambda: ix.ScannIndex(DIM),
    lambda: ix.ScannIndex(DIM, num_leaves=32, leaves_to_search=32, hashing=True, reorder=4000),
    lambda: ix.HierarchicalIndex(DIM, d_low=32, candidates=4000),
    lambda: ix.HierarchicalIndex(DIM, d_low=32, candidates=4000, normalize_prefix=True),
], ids=["exact", "scann-brute", "scann-tree-ah", "hierarchical", "hierarchical-normalized"])
def test_ids_after_add_and_delete(make, clustered):
    """Deleting and adding ids gives the results of an index built on what is left (every
    setting here searches exhaustively, so the results are exact)."""
    db, queries = clustered
    db, queries = db[:2000], queries[:20]
    ids = _ids(len(db))
    index = make().add(db, ids)
    rng = np.random.default_rng(3)
    gone = rng.choice(ids, 300, replace=False)
    gone = np.concatenate([gone, [ids[-1], ids[0]]])  # the last row and the first
    index.delete(gone)
    new = rng.standard_normal((50, DIM)).astype(np.float32)
    new_ids = np.arange(50) + 10**6
    index.add(new, new_ids)
    keep = ~np.isin(ids, gone)
    left = np.concatenate([db[keep], new])
    left_ids = np.concatenate([ids[keep], new_ids])
    assert sorted(index.ids.tolist()) == sorted(left_ids.tolist())
    rows, _ = ix.numpy_top_k(queries, left, 10)
    np.testing.assert_array_equal(index.search(queries, 10).ids, left_ids[rows])
    with pytest.raises(KeyError, match="not in the index"):
        index.delete([gone[0]])
    with pytest.raises(ValueError, match="already in the index"):
        index.add(new[:1], new_ids[:1])


@pytest.mark.parametrize("make", [
    lambda: ix.ExactIndex(DIM, chunk_size=512),
    lambda: ix.ScannIndex(DIM, num_leaves=16, leaves_to_search=4, hashing=True),
    lambda: ix.HierarchicalIndex(DIM, d_low=16, candidates=50),
    lambda: ix.HierarchicalIndex(DIM, d_low=16, candidates=50, normalize_prefix=True),
], ids=["exact", "scann", "hierarchical", "hierarchical-normalized"])
def test_save_load_round_trip(make, clustered, tmp_path):
    db, queries = clustered
    index = make().add(db, _ids(len(db)))
    index.delete(index.ids[:5])
    index.info.update(model_fingerprint="sha256:aa", health={"recall@10": 0.97})
    want = index.search(queries, 10)
    path = index.save(tmp_path / "index")
    loaded = ix.load_index(path, fingerprint="sha256:aa")
    assert type(loaded) is type(index) and loaded.params() == index.params()
    assert loaded.info == index.info
    np.testing.assert_array_equal(loaded.ids, index.ids)
    got = loaded.search(queries, 10)
    np.testing.assert_array_equal(got.ids, want.ids)
    np.testing.assert_allclose(got.scores, want.scores, rtol=1e-6)
    # Saving again over it replaces it atomically; no temporary directories are left.
    index.save(path)
    assert sorted(os.listdir(tmp_path)) == ["index"]


def test_bad_input_errors(clustered, tmp_path):
    db, queries = clustered
    index = ix.ScannIndex(DIM).add(db[:500])
    with pytest.raises(ValueError, match="dimension 32 but the index has dimension 64"):
        index.search(queries[:, :32], 5)
    with pytest.raises(ValueError, match="dimension 65 but the index has dimension 64"):
        index.add(np.zeros((2, 65), np.float32))
    with pytest.raises(ValueError, match="NaN"):
        index.search(np.full(DIM, np.nan, np.float32), 5)
    with pytest.raises(ValueError, match="ids repeat"):
        index.add(db[:2], [7000, 7000])
    with pytest.warns(UserWarning, match="k=1000 is larger than the index \\(500 vectors\\)"):
        result = index.search(queries[:3], 1000)
    assert result.ids.shape == (3, 500) and sorted(result.ids[0]) == list(range(500))
    with pytest.raises(ValueError, match="empty"):
        ix.ExactIndex(DIM).search(queries, 3)

    index.info["model_fingerprint"] = "sha256:model-a"
    path = index.save(tmp_path / "index")
    with pytest.raises(ix.FingerprintMismatchError, match="sha256:model-a.*sha256:model-b"):
        ix.load_index(path, fingerprint="sha256:model-b")
    assert len(ix.load_index(path, fingerprint="sha256:model-b", force=True)) == 500
    # A partial file, a missing file, a missing manifest: errors, never wrong results.
    meta = json.loads((tmp_path / "index" / base.META_FILE).read_text())
    scann_file = next(n for n in meta["files"] if n.startswith("scann/"))
    with open(tmp_path / "index" / scann_file, "r+b") as f:
        f.truncate(max(0, meta["files"][scann_file] - 1))
    with pytest.raises(ix.IndexFormatError, match="partial or modified"):
        ix.load_index(path)
    os.remove(tmp_path / "index" / scann_file)
    with pytest.raises(ix.IndexFormatError, match="is missing"):
        ix.load_index(path)
    os.remove(tmp_path / "index" / base.META_FILE)
    with pytest.raises(ix.IndexFormatError, match="index.json is missing"):
        ix.load_index(path)
    with pytest.raises(ix.IndexFormatError, match="does not exist"):
        ix.load_index(tmp_path / "nowhere")


def test_scann_parameter_rule():
    small = ix.scann_params(5_000, 768)
    assert not small.hashing and small.num_leaves == 0
    medium = ix.scann_params(50_000, 768)
    assert medium.hashing and medium.num_leaves == 0
    large = ix.scann_params(1_000_000, 768)
    assert large.hashing and large.num_leaves == 1000 and large.leaves_to_search == 50
    assert large.training_sample_size == 250_000 and large.reorder == 250
    assert medium.reorder == 100 and ix.scann_params(150_000, 768).training_sample_size == 150_000
    assert ix.scann_params(1_000_000, 768, leaves_to_search=20).leaves_to_search == 20
    assert ix.scann_params(50_000, 768, num_leaves=100).leaves_to_search == 5
    with pytest.raises(ValueError, match="unknown ScaNN parameter"):
        ix.scann_params(10, 8, leaves=3)
    with pytest.raises(ValueError, match="leaves_to_search"):
        scann_index.ScannParams(num_leaves=10, leaves_to_search=11)


def test_coarse_to_fine_parameter_rule():
    """The coarse stage hashes with one dimension per block over a tree of 2√n leaves (the
    full-dimension rule's √n otherwise); each is overridable, and a built index records it."""
    rule = lambda n, **o: ix.HierarchicalIndex(768, 128, **o)._resolve_params(n, 768)  # noqa
    large = rule(1_000_000)
    assert (large.num_leaves, large.leaves_to_search, large.dims_per_block) == (2000, 100, 1)
    assert large.hashing and large.training_sample_size == 250_000 and large.reorder == 250
    assert rule(1_000_000, num_leaves=1000).num_leaves == 1000
    assert rule(1_000_000, leaves_to_search=7).leaves_to_search == 7
    assert rule(1_000_000, dims_per_block=2).dims_per_block == 2
    small = rule(5_000)  # below the tree size: a two-leaf tree searched whole
    assert (small.num_leaves, small.leaves_to_search, small.dims_per_block) == (2, 2, 1)
    vectors_, _ = vectors.clustered(2_000, DIM, 1, seed=3)
    built = ix.HierarchicalIndex(DIM, 16).add(vectors_, np.arange(2_000))
    assert built.params()["scann"]["dims_per_block"] == 1
