"""The patch re-ranker: UNITER's single stream over a caption and its own ViT's class and
patch tokens (CrossEncoder with image_tower="vit"). Its scores on pixels equal its scores on
its own patch regions; the on-demand patch store equals the model, stays within its cache and
compiles one program; the jitted re-ranking path over the store equals the model on every
pair; bad input and configs are refused by name; a pixel dual encoder warm-starts it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldot_jax.checkpoints import initialize, pretrained
from ldot_jax.data import pipeline
from ldot_jax.models.config import (CrossEncoderConfig, DualEncoderConfig, PixelConfig,
                                    RegionConfig, TransformerConfig)
from ldot_jax.models.cross_encoder import CrossEncoder
from ldot_jax.models.vit import patch_boxes
from ldot_jax.retrieval import rerank

SIDE, PATCH, WIDTH = 16, 4, 16  # a 4 × 4 grid: 17 regions of dim 16
TEXT = TransformerConfig(vocab_size=64, hidden_size=16, num_layers=1, num_heads=2,
                         intermediate_size=32, max_position_embeddings=32, hidden_dropout=0.0,
                         attention_dropout=0.0)
VIT = TransformerConfig(vocab_size=1, hidden_size=WIDTH, num_layers=1, num_heads=2,
                        intermediate_size=4 * WIDTH, max_position_embeddings=1)


def _config(**changes):
    values = dict(transformer=TEXT, region=RegionConfig(WIDTH, 7, 3), image_tower="vit",
                  image=VIT, pixels=PixelConfig(SIDE, PATCH))
    return CrossEncoderConfig(**{**values, **changes})


def _random_params(kind, config, seed=0):
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        noise = rng.normal(0.0, 0.2, leaf.shape).astype(np.float32)
        return 1.0 + noise / 2 if "scale" in jax.tree_util.keystr(path) else noise
    return jax.tree.map(np.asarray, jax.tree.map_with_path(
        draw, pretrained.abstract_params(kind, config)))


@pytest.fixture(scope="module")
def setup():
    config = _config()
    model = pretrained.build_model("uniter_itm", config)
    params = _random_params("uniter_itm", config)
    rng = np.random.default_rng(0)
    records = [{"image": rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)}
               for _ in range(7)]
    captions = [np.concatenate([[1], rng.integers(3, 64, n - 2), [2]]).astype(np.int32)
                for n in (5, 9, 12, 7)]
    return dict(model=model, params=params, records=records, captions=captions)


def test_patch_boxes_tile_the_picture():
    boxes = patch_boxes(4)
    assert boxes.shape == (17, 7)
    np.testing.assert_array_equal(boxes[0], [0, 0, 1, 1, 1, 1, 1])
    cells = boxes[1:]
    assert np.isclose(cells[:, 6].sum(), 1.0)  # the cells' areas cover the picture once
    np.testing.assert_allclose(cells[:, 2] - cells[:, 0], cells[:, 4])
    np.testing.assert_allclose(cells[5, :4], [0.25, 0.25, 0.5, 0.5])  # row 1, column 1
    assert len({tuple(b) for b in cells[:, :2]}) == 16


def test_scores_on_pixels_equal_scores_on_its_patch_regions(setup):
    model, params = setup["model"], setup["params"]
    assert "vit" in params and {"conv1", "transformer"} <= set(params["vit"])
    pixels = {"pixels": jnp.asarray(np.stack([r["image"] for r in setup["records"][:4]]))}
    ids = np.stack([np.pad(c, (0, 12 - len(c))) for c in setup["captions"]])
    text = {"input_ids": ids, "attention_mask": (ids > 0).astype(np.int32)}
    regions = model.apply({"params": params}, pixels, method=CrossEncoder.patch_regions)
    assert regions["region_feat"].shape == (4, 17, WIDTH)
    direct = model.apply({"params": params}, text, pixels, method=CrossEncoder.score)
    via = model.apply({"params": params}, text, regions, method=CrossEncoder.score)
    np.testing.assert_array_equal(direct, via)
    assert len(np.unique(np.asarray(direct))) == 4  # pairs are told apart


def test_patch_store_equals_the_model_and_stays_within_its_cache(setup):
    model, params, records = setup["model"], setup["params"], setup["records"]
    store = rerank.PatchImageStore(records, model, params, cache_images=3, batch_size=2)
    assert (len(store), store.num_regions, store.feat_dim, store.box_dim) == (7, 17, WIDTH, 7)
    store.warmup()
    rows = store.rows(np.array([6, 0, 3, 0, 5]))
    pixels = {"pixels": np.stack([records[i]["image"] for i in (6, 0, 3, 0, 5)])}
    want = model.apply({"params": params}, pixels, method=CrossEncoder.patch_regions)
    np.testing.assert_allclose(rows["region_feat"], want["region_feat"], atol=1e-6)
    np.testing.assert_array_equal(rows["boxes"], np.broadcast_to(patch_boxes(4), (5, 17, 7)))
    assert rows["region_mask"].shape == (5, 17) and rows["region_mask"].all()
    # Seven images through a three-image cache: memory stays at three images' tokens.
    store.rows(np.arange(7))
    assert store.resident_bytes == 3 * 17 * WIDTH * 4
    assert store._encode._cache_size() == 1  # one program: batches are padded to 2


def test_reranking_over_patches_equals_the_model_on_every_pair(setup):
    model, params, records, captions = (setup[k] for k in ("model", "params", "records",
                                                            "captions"))
    tokenized = pipeline.TokenizedCaptions(image=np.array([0, 1, 2, 3], np.int32),
                                           token_ids=captions, skipped=0, num_images=7)
    store = rerank.PatchImageStore(records, model, params)
    reranker = rerank.CrossEncoderReranker(model, params, store,
                                           rerank.CaptionStore.from_captions(tokenized),
                                           pairs_per_batch=8, text_buckets=(16,))
    reranker.warmup()
    compiled = reranker.compiles
    ids = np.stack([np.pad(c, (0, 16 - len(c))) for c in captions])
    text = {"input_ids": ids, "attention_mask": (ids > 0).astype(np.int32)}
    candidates = np.array([[6, 2, 0], [1, 3, 5], [4, 4, 2], [0, 1, 6]])
    got = reranker("text_to_image", text, candidates, np.zeros(candidates.shape, np.float32))
    for q in range(4):
        pixels = {"pixels": np.stack([records[i]["image"] for i in candidates[q]])}
        query = {k: np.repeat(v[q:q + 1], 3, axis=0) for k, v in text.items()}
        want = model.apply({"params": params}, query, pixels, method=CrossEncoder.score)
        np.testing.assert_allclose(got[q], want, rtol=1e-5, atol=1e-5)
    # Image queries: the store's rows as the query input, captions as candidates.
    images = store.rows(np.array([2, 5]))
    got = reranker("image_to_text", images, np.array([[0, 3], [2, 1]]), np.zeros((2, 2)))
    for q, image in enumerate((2, 5)):
        pixels = {"pixels": np.repeat(records[image]["image"][None], 2, axis=0)}
        rows = [[0, 3], [2, 1]][q]
        query = {k: v[rows] for k, v in text.items()}
        want = model.apply({"params": params}, query, pixels, method=CrossEncoder.score)
        np.testing.assert_allclose(got[q], want, rtol=1e-5, atol=1e-5)
    assert reranker.compiles == compiled  # nothing compiled after warmup


def test_bad_inputs_and_configs_are_refused_by_name(setup):
    model, params = setup["model"], setup["params"]
    with pytest.raises(ValueError, match=r"region.feat_dim=8 .* image.hidden_size=16"):
        _config(region=RegionConfig(8, 7, 3))
    with pytest.raises(ValueError, match="image_tower='resnet'"):
        _config(image_tower="resnet")
    region_model = pretrained.build_model("uniter_itm", CrossEncoderConfig(
        TEXT, RegionConfig(WIDTH, 7, 3)))
    with pytest.raises(ValueError, match="needs a patch re-ranker"):
        rerank.PatchImageStore(setup["records"], region_model, params)
    store = rerank.PatchImageStore([{"captions": []}, {"image": np.zeros((8, 8, 3),
                                                                         np.uint8)}],
                                   model, params)
    with pytest.raises(ValueError, match="record 0 has no picture"):
        store.rows(np.array([0]))
    with pytest.raises(ValueError, match=r"image 1 has pixels uint8\[8, 8, 3\].*\[16, 16, 3\]"):
        store.rows(np.array([1]))
    with pytest.raises(IndexError, match="image id 5 is outside"):
        store.rows(np.array([5]))


def test_a_pixel_dual_encoder_warm_starts_the_patch_reranker(tmp_path):
    dual_config = DualEncoderConfig(text=TEXT, image=VIT, project_dim=8, image_tower="vit",
                                    pixels=PixelConfig(SIDE, PATCH))
    dual_params = _random_params("lightningdot", dual_config, seed=1)
    directory = pretrained.save_pretrained(tmp_path / "dual", "lightningdot", dual_config,
                                           dual_params)
    cross_config = _config()
    fresh = _random_params("uniter_itm", cross_config, seed=2)
    params = initialize.from_pretrained(fresh, "uniter_itm", {"model": directory})
    same = lambda a, b: jax.tree.all(jax.tree.map(np.array_equal, a, b))
    assert same(params["vit"], dual_params["image_tower"]["visual"])
    bert = dual_params["text_tower"]["bert"]
    assert same(params["uniter"]["embeddings"], bert["embeddings"])
    assert same(params["uniter"]["encoder"], bert["encoder"])
    # The region embeddings and the heads keep their initialization.
    assert same(params["uniter"]["region_embeddings"], fresh["uniter"]["region_embeddings"])
    assert same(params["rank_output"], fresh["rank_output"])


def test_a_patch_reranker_initializes_the_pixel_towers_vldeformer(tmp_path):
    """VLDeformer on pixels: the text tower from the re-ranker's words and layers, the ViT
    tower's trunk from its ViT; the projections keep their initialization."""
    cross_config = _config()
    cross_params = _random_params("uniter_itm", cross_config, seed=3)
    directory = pretrained.save_pretrained(tmp_path / "rerank", "uniter_itm", cross_config,
                                           cross_params)
    dual_config = DualEncoderConfig(text=TEXT, image=VIT, project_dim=8, image_tower="vit",
                                    pixels=PixelConfig(SIDE, PATCH))
    fresh = _random_params("lightningdot", dual_config, seed=4)
    params = initialize.from_pretrained(fresh, "lightningdot",
                                        {"text": directory, "image": directory})
    same = lambda a, b: jax.tree.all(jax.tree.map(np.array_equal, a, b))
    assert same(params["image_tower"]["visual"], cross_params["vit"])
    bert = params["text_tower"]["bert"]
    assert same(bert["embeddings"], cross_params["uniter"]["embeddings"])
    assert same(bert["encoder"], cross_params["uniter"]["encoder"])
    np.testing.assert_array_equal(params["image_tower"]["proj"], fresh["image_tower"]["proj"])
    assert not np.array_equal(params["image_tower"]["visual"]["conv1"]["kernel"],
                              fresh["image_tower"]["visual"]["conv1"]["kernel"])


def test_distillation_from_a_patch_reranker_reads_each_picture_once(setup):
    """The distill task encodes the batch's pictures with the teacher's ViT once and gathers
    the tokens per candidate: the KL equals the teacher reading the pixels of every pair."""
    from ldot_jax.training import tasks
    from ldot_jax.training.tasks import distill

    dual_config = DualEncoderConfig(text=TEXT, image=VIT, project_dim=8, image_tower="vit",
                                    pixels=PixelConfig(SIDE, PATCH))
    dual = pretrained.build_model("lightningdot", dual_config)
    dual_params = _random_params("lightningdot", dual_config, seed=3)
    rng = np.random.default_rng(4)
    b = 6
    ids = np.concatenate([np.ones((b, 1)), rng.integers(3, 64, (b, 7))], 1).astype(np.int32)
    batch = {"text": {"input_ids": ids, "attention_mask": np.ones_like(ids)},
             "image": {"pixels": rng.integers(0, 256, (b, SIDE, SIDE, 3), dtype=np.uint8)},
             "image_index": np.arange(b, dtype=np.int32), "valid": np.ones(b, bool)}
    params = {"model": dual_params, "teacher": setup["params"]}
    task_setup = tasks.TaskSetup(dual, None, frozen={"teacher": setup["model"]},
                                 configs={"distill": tasks.DistillConfig(candidates=3)})
    text, image = (np.asarray(x) for x in tasks.common.embed_pair(
        dual, dual_params, batch, jax.random.key(0), deterministic=True))
    inputs = distill._teacher_inputs(task_setup, params, batch)
    assert inputs["image"]["region_feat"].shape == (b, 17, WIDTH)
    for direction, (queries, keys) in (("t2i", (text, image)), ("i2t", (image, text))):
        args = (direction, queries, keys, jax.random.key(5), 20.0)
        once = distill._direction_loss(task_setup, params, batch, inputs, *args)
        every_pair = distill._direction_loss(task_setup, params, batch,
                                             {"text": batch["text"], "image": batch["image"]},
                                             *args)
        assert float(once) > 0
        np.testing.assert_allclose(float(once), float(every_pair), rtol=1e-5)
