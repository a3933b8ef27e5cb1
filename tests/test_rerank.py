"""The cross-encoder re-ranker (the slow stage) on a tiny random-init UNITER: its scores equal
the model applied to every (caption, image) pair at unpadded shapes, in both directions; a
mesh of 8 devices gives the scores of one device; after warmup nothing compiles; score fusion
and the choice of alpha match a NumPy brute force; bad input is refused by name."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldot_jax.bench.two_stage import GeneratedRecords
from ldot_jax.checkpoints import pretrained
from ldot_jax.core import parallel
from ldot_jax.data import pipeline
from ldot_jax.data.batching import prefix_mask
from ldot_jax.models.config import CrossEncoderConfig, RegionConfig, TransformerConfig
from ldot_jax.retrieval import rerank

BUCKETS = (8, 16)
# Two caption lengths (buckets 8 and 16) × two region counts (R = 5; the 2-region images are
# padded), each in groups of equal size: the reference compiles one program per shape only.
REGION_COUNTS = (2, 5, 2, 5, 5, 2)
CAPTION_LENGTHS = (4, 13) * 6  # caption t belongs to image t // 2
FEAT_DIM = 32

# Under pytest-xdist the module fixtures are built once, on one worker.
pytestmark = pytest.mark.xdist_group("test_rerank")


def _config():
    # The `tiny` preset's sizes.
    transformer = TransformerConfig(vocab_size=64, hidden_size=16, num_layers=1, num_heads=2,
                                    intermediate_size=32, max_position_embeddings=32,
                                    hidden_dropout=0.0, attention_dropout=0.0)
    return CrossEncoderConfig(transformer, RegionConfig(feat_dim=FEAT_DIM, box_dim=7,
                                                        num_classes=8))


def _random_params(config, seed=0):
    """Random params of the model's shapes, drawn in NumPy (a jitted init would compile a
    program for nothing): weights normal(0, 0.2), so pairs get clearly different scores,
    LayerNorm scales near 1."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        noise = rng.normal(0.0, 0.2, leaf.shape).astype(np.float32)
        return 1.0 + noise / 2 if "scale" in jax.tree_util.keystr(path) else noise
    return jax.tree.map_with_path(draw, pretrained.abstract_params("uniter_itm", config))


def _reference(model, params, captions, records):
    """(rank f32[T, N], itm f32[T, N]): the module on every (caption t, image i) pair, one
    call per (caption length, region count), so that no pair is padded."""
    @jax.jit
    def scores(ids, feat, boxes):
        args = ({"input_ids": ids, "attention_mask": jnp.ones_like(ids)},
                {"region_feat": feat, "boxes": boxes,
                 "region_mask": jnp.ones(feat.shape[:2], jnp.int32)})
        rank = model.apply({"params": params}, *args, method=model.score)
        itm = model.apply({"params": params}, *args).itm_logits
        return rank, itm[:, 1] - itm[:, 0]

    rank = np.full((len(captions), len(records)), np.nan, np.float32)
    itm = rank.copy()
    by_length, by_regions = {}, {}
    for t, tokens in enumerate(captions):
        by_length.setdefault(len(tokens), []).append(t)
    for i, record in enumerate(records):
        by_regions.setdefault(len(record["region_feat"]), []).append(i)
    for texts in by_length.values():
        for images in by_regions.values():
            t, i = np.repeat(texts, len(images)), np.tile(images, len(texts))
            rank[t, i], itm[t, i] = scores(
                np.stack([captions[k] for k in t]),
                np.stack([records[k]["region_feat"] for k in i]),
                np.stack([records[k]["boxes"] for k in i]))
    assert not np.isnan(rank).any() and not np.isnan(itm).any()
    return rank, itm


@pytest.fixture(scope="module")
def setup():
    config = _config()
    model = pretrained.build_model("uniter_itm", config)
    params = _random_params(config)
    rng = np.random.default_rng(0)
    records = [{"region_feat": rng.normal(size=(n, FEAT_DIM)).astype(np.float32),
                "boxes": rng.uniform(size=(n, 7)).astype(np.float32)} for n in REGION_COUNTS]
    captions = [np.concatenate([[1], rng.integers(3, 64, length - 2), [2]]).astype(np.int32)
                for length in CAPTION_LENGTHS]
    tokenized = pipeline.TokenizedCaptions(image=np.arange(len(captions), dtype=np.int32) // 2,
                                           token_ids=captions, skipped=0,
                                           num_images=len(records))
    rank, itm = _reference(model, params, captions, records)
    return dict(model=model, params=params, records=records, captions=captions,
                images=rerank.ImageStore.from_records(records),
                caption_store=rerank.CaptionStore.from_captions(tokenized), rank=rank, itm=itm)


@pytest.fixture(scope="module")
def reranker(setup):
    """Warmed up once: no test may make it compile again."""
    out = rerank.CrossEncoderReranker(setup["model"], setup["params"], setup["images"],
                                      setup["caption_store"], pairs_per_batch=8,
                                      text_buckets=BUCKETS)
    out.warmup()
    return out


def _text_queries(captions, rows, width=20, seed=0):
    """input_ids / attention_mask i32[Q, width]; junk tokens past each caption (masked)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, 64, (len(rows), width)).astype(np.int32)
    lengths = np.asarray([len(captions[t]) for t in rows])
    for q, t in enumerate(rows):
        ids[q, :len(captions[t])] = captions[t]
    return {"input_ids": ids, "attention_mask": prefix_mask(lengths, width)}


def _image_queries(records, rows, width=7):
    """region_feat / boxes / region_mask over `width` regions (zeros past the mask), more or
    fewer than the re-ranker's R."""
    out = {"region_feat": np.zeros((len(rows), width, FEAT_DIM), np.float32),
           "boxes": np.zeros((len(rows), width, 7), np.float32),
           "region_mask": np.zeros((len(rows), width), np.int32)}
    for q, i in enumerate(rows):
        n = len(records[i]["region_feat"])
        out["region_feat"][q, :n] = records[i]["region_feat"]
        out["boxes"][q, :n] = records[i]["boxes"]
        out["region_mask"][q, :n] = 1
    return out


def _permutations(q, m, seed):
    rng = np.random.default_rng(seed)
    return np.stack([rng.permutation(m) for _ in range(q)]).astype(np.int64)


def _check_ranking(got, candidates, want):
    """got f32[Q, M] against want[q, candidates[q, j]]: scores and the re-sorted ids."""
    np.testing.assert_allclose(got, np.take_along_axis(want, candidates, 1), atol=1e-5)
    got_ids = np.take_along_axis(candidates, np.argsort(-got, axis=1, kind="stable"), 1)
    np.testing.assert_array_equal(got_ids, np.argsort(-want, axis=1, kind="stable"))


def test_text_to_image_with_every_image_equals_the_exact_cross_encoder(setup, reranker):
    captions, rank = setup["captions"], setup["rank"]
    store = setup["caption_store"]
    np.testing.assert_array_equal(store.lengths, CAPTION_LENGTHS)
    np.testing.assert_array_equal(store.input_ids[1, :13], captions[1])
    assert store.input_ids.shape == (12, 13) and not store.input_ids[0, 4:].any()
    assert setup["images"].num_regions == 5
    np.testing.assert_array_equal(setup["images"].image["region_mask"].sum(1), REGION_COUNTS)
    candidates = _permutations(len(captions), len(setup["records"]), seed=1)
    queries = _text_queries(captions, range(len(captions)))
    got = reranker("text_to_image", queries, candidates, np.zeros(candidates.shape))
    _check_ranking(got, candidates, rank)
    # The same pairs through score_pairs (tokens with their lengths against stored images).
    lengths = queries["attention_mask"].sum(1)
    flat = reranker.score_pairs(np.repeat(queries["input_ids"], candidates.shape[1], 0),
                                np.repeat(lengths, candidates.shape[1]), candidates.ravel())
    np.testing.assert_allclose(flat.reshape(candidates.shape), got, atol=1e-5)


def test_image_to_text_with_every_caption_equals_the_exact_cross_encoder(setup, reranker):
    records, rank = setup["records"], setup["rank"].T
    candidates = _permutations(len(records), len(setup["captions"]), seed=2)
    # A missing candidate (-1) in every row, at a different place each time.
    with_missing = np.stack([np.insert(row, (q * 5) % 13, -1) for q, row in
                             enumerate(candidates)])
    got = reranker("image_to_text", _image_queries(records, range(len(records))), with_missing,
                   np.zeros(with_missing.shape))
    missing = with_missing < 0
    assert np.isneginf(got[missing]).all() and np.isfinite(got[~missing]).all()
    _check_ranking(got[~missing].reshape(candidates.shape), candidates, rank)


def test_mesh_of_8_devices_equals_one_device(setup, reranker):
    assert jax.device_count() == 8
    sharded = rerank.CrossEncoderReranker(setup["model"], setup["params"], setup["images"],
                                          setup["caption_store"], mesh=parallel.make_mesh(),
                                          pairs_per_batch=16, text_buckets=(16,))
    captions, records = setup["captions"], setup["records"]
    text = _text_queries(captions, range(len(captions)))
    candidates = _permutations(len(captions), len(records), seed=3)
    candidates[::3, 1] = -1
    images = _image_queries(records, range(len(records)))
    caption_ids = _permutations(len(records), len(captions), seed=4)
    for direction, queries, ids in (("text_to_image", text, candidates),
                                    ("image_to_text", images, caption_ids)):
        want = reranker(direction, queries, ids, np.zeros(ids.shape))
        got = sharded(direction, queries, ids, np.zeros(ids.shape))
        np.testing.assert_allclose(got, want, atol=1e-5)
    assert sharded.compiles == 1  # one bucket, the same program for both directions


def test_no_compilation_after_warmup(setup, reranker):
    assert reranker.compiles == len(BUCKETS)
    captions, records = setup["captions"], setup["records"]
    short = [t for t, c in enumerate(captions) if len(c) <= 8]
    long = [t for t, c in enumerate(captions) if len(c) > 8]
    for rows, m, width, seed in ((short[:1], 2, 8, 0), (long, 6, 16, 1),
                                 (list(range(5)), 3, 30, 2), (short + long, 4, 14, 3)):
        candidates = np.random.default_rng(seed).integers(-1, len(records), (len(rows), m))
        got = reranker("text_to_image", _text_queries(captions, rows, width, seed),
                       candidates, np.zeros(candidates.shape))
        assert got.shape == (len(rows), m)
        assert np.isneginf(got[candidates < 0]).all() and np.isfinite(got[candidates >= 0]).all()
    for rows, m, width in (([0], 1, 3), ([5, 1, 2], 9, 9), (list(range(6)), 12, 6)):
        candidates = np.random.default_rng(m).integers(-1, len(captions), (len(rows), m))
        got = reranker("image_to_text", _image_queries(records, rows, width), candidates,
                       np.zeros(candidates.shape))
        assert np.isneginf(got[candidates < 0]).all() and np.isfinite(got[candidates >= 0]).all()
    nothing = reranker("text_to_image", _text_queries(captions, [0, 1]), np.full((2, 3), -1),
                       np.zeros((2, 3)))
    assert np.isneginf(nothing).all()
    # Many pairs (several batches) through the lower-level entry points.
    queries = _text_queries(captions, [t % 12 for t in range(37)])
    image_ids = np.arange(37) % len(records)
    lengths = queries["attention_mask"].sum(1)
    pairs = reranker.score_pairs(queries["input_ids"], lengths, image_ids)
    np.testing.assert_allclose(pairs, setup["rank"][np.arange(37) % 12, image_ids], atol=1e-5)
    regions = _image_queries(records, image_ids, width=5)
    direct = reranker.score_text_image(queries["input_ids"], lengths, regions)
    np.testing.assert_allclose(direct, pairs, atol=1e-5)
    assert reranker.compiles == len(BUCKETS)


def test_itm_head_with_fused_dot_scores(setup):
    alpha = 0.5
    fused = rerank.CrossEncoderReranker(setup["model"], setup["params"], setup["images"],
                                        pairs_per_batch=8, text_buckets=(16,), head="itm",
                                        alpha=alpha)
    captions = setup["captions"]
    candidates = _permutations(3, len(setup["records"]), seed=5)
    dot = np.random.default_rng(6).normal(size=candidates.shape).astype(np.float32)
    got = fused("text_to_image", _text_queries(captions, [0, 3, 6]), candidates, dot)
    want = alpha * dot + np.take_along_axis(setup["itm"][[0, 3, 6]], candidates, 1)
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert fused.compiles == 1


def _brute_force_r1(dot, cross, positive, candidates, alpha):
    fused = cross if alpha == 0 else alpha * dot + cross
    fused = np.where(candidates >= 0, fused, -np.inf)
    top = np.argsort(-fused, axis=1, kind="stable")[:, 0]
    hit = positive[np.arange(len(top)), top] & (candidates[np.arange(len(top)), top] >= 0)
    return 100.0 * hit.mean()


def test_choose_alpha_and_fuse_match_a_brute_force():
    # q0: cross alone is right. q1: needs alpha ≥ 0.5 (at 0.5 a tie, won by position 0).
    # q2: needs alpha < 4. q3: the missing candidate (-1) has the best scores but must not
    # rank first; the real positive wins. q4: a tie in cross scores goes to position 0, a miss.
    cross = np.asarray([[1, 0, 0], [0, .5, 0], [2, 0, 0], [100, 0, .3], [.5, .5, 0]],
                       np.float32)
    dot = np.asarray([[0, 0, 0], [1, 0, 0], [0, .5, 0], [100, 0, 0], [0, 0, 0]], np.float32)
    positive = np.asarray([[1, 0, 0], [1, 0, 0], [1, 0, 0], [0, 0, 1], [0, 1, 0]], bool)
    candidates = np.asarray([[0, 1, 2], [3, 4, 5], [6, 7, 8], [-1, 9, 10], [11, 12, 13]])
    alpha, table = rerank.choose_alpha(dot, cross, positive, grid=(10, 1, 0.1, 0),
                                       candidates=candidates)
    assert alpha == 1.0 and table == {0.0: 60.0, 0.1: 60.0, 1.0: 80.0, 10.0: 60.0}
    alpha, table = rerank.choose_alpha(dot, cross, positive, candidates=candidates)
    want = {a: _brute_force_r1(dot, cross, positive, candidates, a) for a in rerank.ALPHA_GRID}
    assert table == pytest.approx(want)
    assert alpha == 0.5 == min(a for a in want if want[a] == max(want.values()))
    # Equally good alphas: the smallest (0, the re-ranker alone) wins.
    assert rerank.choose_alpha(dot, cross, positive, grid=(0.1, 0), candidates=candidates)[0] == 0
    # Without `candidates`, -inf cross scores mark missing candidates the same way.
    masked = np.where(candidates >= 0, cross, -np.inf)
    assert rerank.choose_alpha(dot, masked, positive, grid=(10, 1, 0.1, 0))[1] == {
        0.0: 60.0, 0.1: 60.0, 1.0: 80.0, 10.0: 60.0}
    np.testing.assert_array_equal(rerank.fuse(dot, cross, None), cross)
    np.testing.assert_array_equal(rerank.fuse(np.full_like(dot, -np.inf), cross, 0), cross)
    np.testing.assert_allclose(rerank.fuse(dot, cross, 2.0), 2 * dot + cross)


def test_bad_input_is_refused_by_name(setup, reranker):
    model, params, images = setup["model"], setup["params"], setup["images"]
    with pytest.raises(ValueError, match="text 0 has 20 tokens, more than the largest text "
                                         "bucket 16"):
        reranker.score_pairs(np.ones((1, 20), np.int32), np.asarray([20]), np.asarray([0]))
    long = rerank.CaptionStore(np.ones((2, 20), np.int32), np.asarray([5, 17]),
                               np.asarray([0, 1]))
    with pytest.raises(ValueError, match="caption 1 has 17 tokens"):
        rerank.CrossEncoderReranker(model, params, captions=long, text_buckets=BUCKETS)
    with pytest.raises(ValueError, match="head='best': expected one of"):
        rerank.CrossEncoderReranker(model, params, images, head="best", text_buckets=BUCKETS)
    with pytest.raises(ValueError, match="pairs_per_batch=12 is not divisible by the 8 devices"):
        rerank.CrossEncoderReranker(model, params, images, mesh=parallel.make_mesh(),
                                    pairs_per_batch=12, text_buckets=BUCKETS)
    with pytest.raises(ValueError, match="max_position_embeddings=32"):
        rerank.CrossEncoderReranker(model, params, images)  # default buckets reach 64
    with pytest.raises(ValueError, match="image 1 has 5 regions, more than region_bucket=4"):
        rerank.ImageStore.from_records(setup["records"], region_bucket=4)
    too_many = _image_queries([{"region_feat": np.ones((6, FEAT_DIM)), "boxes": np.ones((6, 7))}],
                              [0])
    with pytest.raises(ValueError, match="image 0 has 6 regions, more than the re-ranker's R=5"):
        reranker("image_to_text", too_many, np.zeros((1, 1), np.int64), np.zeros((1, 1)))
    with pytest.raises(ValueError, match=r"ids \[6\] are outside \[-1, 6\)"):
        reranker("text_to_image", _text_queries(setup["captions"], [0]), np.asarray([[6]]),
                 np.zeros((1, 1)))
    with pytest.raises(ValueError, match="direction='sideways'"):
        reranker("sideways", {}, np.zeros((1, 1), np.int64), np.zeros((1, 1)))
    assert reranker.compiles == len(BUCKETS)


def test_the_record_store_scores_like_the_in_memory_store(setup, reranker):
    lazy = rerank.RecordImageStore(setup["records"], 5, cache_images=2)
    assert (len(lazy), lazy.num_regions, lazy.feat_dim) == (6, 5, FEAT_DIM)
    index = np.array([3, 0, 3, 5, 1])
    for key, value in setup["images"].rows(index).items():
        np.testing.assert_array_equal(lazy.rows(index)[key], value, err_msg=key)
    other = rerank.CrossEncoderReranker(setup["model"], setup["params"], lazy,
                                        setup["caption_store"], pairs_per_batch=8,
                                        text_buckets=BUCKETS)
    candidates = _permutations(len(setup["captions"]), len(setup["records"]), seed=3)
    queries = _text_queries(setup["captions"], range(len(setup["captions"])))
    np.testing.assert_allclose(
        other("text_to_image", queries, candidates, np.zeros(candidates.shape)),
        reranker("text_to_image", queries, candidates, np.zeros(candidates.shape)), atol=1e-6)


def test_the_record_store_memory_is_bounded_by_its_cache_not_the_corpus():
    """50,000 images, 64 cached: after reading 5,000 candidates the store holds at most 64
    decoded images (their bytes, exactly), the same as over a 1,000-image corpus."""
    per_image = 5 * (FEAT_DIM + 7) * 4  # the most an image can hold (f32)
    resident = {}
    for n in (1_000, 50_000):
        source = GeneratedRecords(n, 5, FEAT_DIM)
        store = rerank.RecordImageStore(source, 5, cache_images=64)
        rng = np.random.default_rng(0)
        for _ in range(20):
            store.rows(rng.integers(0, n, 250))
        assert store.resident_bytes <= 64 * per_image
        assert len(store._cache) == 64
        resident[n] = store.resident_bytes
    assert max(resident.values()) <= 64 * per_image
    # Reads happen only on misses: 64 images read once each, then served from the cache.
    source = GeneratedRecords(50_000, 5, FEAT_DIM)
    store = rerank.RecordImageStore(source, 5, cache_images=64)
    store.rows(np.arange(64))
    assert source.reads == 64  # image 0 (read by the constructor) is among them
    store.rows(np.arange(64)[::-1])
    assert source.reads == 64
    # A hit is not read again; the least recently used image leaves first.
    source = GeneratedRecords(100, 5, FEAT_DIM)
    store = rerank.RecordImageStore(source, 5, cache_images=3)
    store.rows([1, 2, 3])
    reads = source.reads
    store.rows([3, 2, 1])
    assert source.reads == reads
    store.rows([4])  # 3 is the least recently used of {3, 2, 1}: it leaves
    assert sorted(store._cache) == [1, 2, 4]


def test_the_record_store_names_bad_images():
    records = [{"region_feat": np.ones((2, FEAT_DIM), np.float32),
                "boxes": np.full((2, 7), 0.5, np.float32)} for _ in range(4)]
    records[1] = dict(records[1], region_feat=np.full((2, FEAT_DIM), np.nan, np.float32))
    records[2] = {"region_feat": np.ones((9, FEAT_DIM), np.float32),
                  "boxes": np.full((9, 7), 0.5, np.float32)}
    records[3] = dict(records[3], boxes=np.full((2, 7), 300.0, np.float32))
    store = rerank.RecordImageStore(records, 5)
    with pytest.raises(ValueError, match=r"image 1: .*non-finite"):
        store.rows([0, 1])
    with pytest.raises(ValueError, match=r"image 2 has 9 regions, more than region_bucket=5"):
        store.rows([2])
    with pytest.raises(ValueError, match=r"image 3: .*pixel coordinates"):
        store.rows([3])
    with pytest.raises(IndexError, match=r"image id 4 is outside \[0, 4\)"):
        store.rows([4])
