"""grain pipelines: bucket shapes only, epochs that cover every caption once (per process
shards disjoint), resume from a saved iterator state, masks, length policy, evaluation that
yields every image and caption exactly once."""

import logging

import jax
import numpy as np
import pytest

from ldot_jax.data import batching, masking, pipeline, scenes
from ldot_jax.data.tokenizer import Tokenizer
from conftest import flat

CONFIG = scenes.ScenesConfig(feat_dim=32)
TEXT_BUCKETS, REGION_BUCKETS = (8, 12, 16, 24), (4, 6, 8)


@pytest.fixture(scope="module")
def images():
    return scenes.generate_chunk((3, "train", 0, 37, CONFIG, 0))


@pytest.fixture(scope="module")
def tokenizer(images):
    return Tokenizer.train((c for r in images for c in r["captions"]), 300)


@pytest.fixture(scope="module")
def index(images, tokenizer):
    return pipeline.tokenize_captions(images, tokenizer, 22, "drop")


def _config(**kw):
    base = dict(batch_size=12, text_buckets=TEXT_BUCKETS, region_buckets=REGION_BUCKETS,
                max_text_len=22, num_threads=2)
    return pipeline.PipelineConfig(**{**base, **kw})


def test_batches_have_bucket_shapes_and_true_pairs(images, index, tokenizer):
    it = iter(pipeline.training_dataset(images, index, tokenizer, _config()))
    for _ in range(20):
        batch = next(it)
        ids_shape = batch["text"]["input_ids"].shape
        assert ids_shape[0] == 12 and ids_shape[1] in TEXT_BUCKETS
        assert batch["image"]["region_feat"].shape[1] in REGION_BUCKETS
        assert batch["valid"].all()
        for row in range(12):  # each row pairs a caption with its own image
            t, i = batch["text_index"][row], batch["image_index"][row]
            assert index.image[t] == i
            ids = index.token_ids[t]
            np.testing.assert_array_equal(batch["text"]["input_ids"][row, :len(ids)], ids)
            n = len(images[i]["region_feat"])
            np.testing.assert_array_equal(batch["image"]["region_feat"][row, :n],
                                          images[i]["region_feat"])
            assert batch["image"]["region_mask"][row].sum() == n
        positives = batching.same_image(batch["image_index"])
        assert (positives == (index.image[batch["text_index"]][:, None]
                              == index.image[batch["text_index"]][None, :])).all()


def test_masks(images, index, tokenizer):
    it = iter(pipeline.training_dataset(images, index, tokenizer, _config()))
    batch = next(it)
    labels, masked = batch["vmlm_labels"], batch["vmlm_text"]["input_ids"]
    selected = labels >= 0
    assert selected.any(axis=1).all()  # at least one per caption
    lengths = batch["text"]["attention_mask"].sum(1)
    assert not selected[:, 0].any() and not selected[np.arange(12), lengths - 1].any()
    np.testing.assert_array_equal(labels[selected], batch["text"]["input_ids"][selected])
    np.testing.assert_array_equal(masked[~selected], batch["text"]["input_ids"][~selected])
    region = batch["region_masked"]
    assert region.any(axis=1).all() and not (region & (batch["image"]["region_mask"] == 0)).any()


@pytest.mark.parametrize("processes", [1, 3])
def test_epochs_cover_every_caption_once(images, index, tokenizer, processes):
    config = _config(num_epochs=2, mask_text=False, mask_regions=False)
    epochs = {0: [], 1: []}
    steps = pipeline.steps_per_epoch(index, config, processes)
    for p in range(processes):
        batches = list(pipeline.training_dataset(images, index, tokenizer, config, p, processes))
        assert len(batches) == 2 * steps  # same step count on every process
        for k, batch in enumerate(batches):
            epochs[k // steps].append(batch["text_index"])
    for epoch in epochs.values():
        seen = np.concatenate(epoch)
        assert len(np.unique(seen)) == len(seen)  # disjoint shards, no repeats in an epoch
        assert len(seen) >= len(index) - processes * (12 + 1)  # only the remainders are left
    assert not np.array_equal(np.concatenate(epochs[0]), np.concatenate(epochs[1]))


def test_resume_continues_the_same_order_and_masks(images, index, tokenizer):
    dataset = pipeline.training_dataset(images, index, tokenizer, _config(seed=7))
    it = iter(dataset)
    for _ in range(5):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(8)]  # crosses an epoch boundary
    resumed = iter(pipeline.training_dataset(images, index, tokenizer, _config(seed=7)))
    resumed.set_state(state)
    for want in expected:
        got = next(resumed)
        assert jax.tree.structure(want) == jax.tree.structure(got)  # the same keys, nested
        jax.tree.map(np.testing.assert_array_equal, got, want)
    other_seed = next(iter(pipeline.training_dataset(images, index, tokenizer, _config(seed=8))))
    assert not np.array_equal(other_seed["text_index"], expected[0]["text_index"])


def test_length_policy_counts_and_logs(images, tokenizer, caplog):
    lengths = [len(p) for p in tokenizer.wordpieces([c for r in images for c in r["captions"]])]
    limit = int(np.median(lengths))
    with caplog.at_level(logging.WARNING):
        index = pipeline.tokenize_captions(images, tokenizer, limit, "drop", "train")
    assert index.skipped == sum(n > limit for n in lengths) > 0
    assert f"{index.skipped} of {len(lengths)} captions skipped" in caplog.text
    assert max(len(t) for t in index.token_ids) <= limit + 2
    truncated = pipeline.tokenize_captions(images, tokenizer, limit, "truncate")
    assert truncated.skipped == 0 and len(truncated) == len(lengths)


def test_bad_pipeline_settings(images, index, tokenizer):
    with pytest.raises(ValueError, match="exceeds the largest text bucket 24"):
        _config(max_text_len=30)
    with pytest.raises(ValueError, match="not divisible by the 5 processes"):
        pipeline.training_dataset(images, index, tokenizer, _config(), 0, 5)
    with pytest.raises(ValueError, match="fewer than one batch"):
        pipeline.training_dataset(images, index, tokenizer, _config(batch_size=400))
    with pytest.raises(ValueError, match="no captions in 2 images"):
        pipeline.tokenize_captions([{"captions": []}] * 2, tokenizer, None, "drop")


@pytest.mark.parametrize("processes", [1, 3])
def test_evaluation_yields_everything_once(images, index, processes):
    image_seen, caption_seen, counts = [], [], set()
    for p in range(processes):
        batches = list(pipeline.eval_image_batches(images, 8, REGION_BUCKETS, p, processes))
        counts.add(len(batches))
        for batch in batches:
            assert "text" not in batch  # image-only examples: no dummy caption
            assert batch["image"]["region_feat"].shape[0] == 8
            assert batch["image"]["region_feat"].shape[1] in REGION_BUCKETS
            assert (batch["image_index"][~batch["valid"]] == -1).all()
            valid = batch["image_index"][batch["valid"]]
            image_seen += valid.tolist()
            for row, i in enumerate(batch["image_index"]):
                if i >= 0:
                    n = len(images[i]["region_feat"])
                    np.testing.assert_array_equal(batch["image"]["region_feat"][row, :n],
                                                  images[i]["region_feat"])
                    assert batch["image"]["region_mask"][row].sum() == n
        caption_batches = list(pipeline.eval_caption_batches(index, 16, TEXT_BUCKETS, p,
                                                             processes))
        counts.add(("captions", len(caption_batches)))
        for batch in caption_batches:
            assert "image" not in batch  # text-only examples: no dummy region
            assert batch["text"]["input_ids"].shape[0] == 16
            assert batch["text"]["input_ids"].shape[1] in TEXT_BUCKETS
            t = batch["text_index"][batch["valid"]]
            caption_seen += t.tolist()
            np.testing.assert_array_equal(batch["image_index"][batch["valid"]], index.image[t])
    assert sorted(image_seen) == list(range(len(images)))
    assert sorted(caption_seen) == list(range(len(index)))
    assert len(counts) == 2  # every process runs the same number of batches


def test_pretokenized_captions(tmp_path):
    class Special:
        cls_id, sep_id = 101, 102
    record = {"captions": [b"a", b"b"], "caption_ids": np.array([7, 8, 9], np.int32),
              "caption_lengths": np.array([2, 1], np.int32)}
    index = pipeline.tokenize_captions([record, record], Special(), 1, "drop")
    assert [t.tolist() for t in index.token_ids] == [[101, 9, 102], [101, 9, 102]]
    assert index.skipped == 2 and index.image.tolist() == [0, 1]
    with pytest.raises(ValueError, match="length policy 'cut'"):  # the tokenizer's policy check
        pipeline.tokenize_captions([record], Special(), 1, "cut")


def test_a_process_past_the_end_gets_invalid_batches_of_the_same_shape(images):
    per_process = [list(pipeline.eval_image_batches(images[:5], 4, REGION_BUCKETS, p, 4))
                   for p in range(4)]
    assert [len(b) for b in per_process] == [1, 1, 1, 1]
    last = per_process[3][0]
    assert not last["valid"].any() and (last["image_index"] == -1).all()
    shape = last["image"]["region_feat"].shape
    assert shape[0] == 4 and shape[1] in REGION_BUCKETS
    seen = sorted(i for b in per_process for i in b[0]["image_index"][b[0]["valid"]])
    assert seen == [0, 1, 2, 3, 4]


def test_process_shards_assemble_the_single_process_batch(images, index, tokenizer):
    """Rows, padding shapes and masks of a global batch do not depend on the process count:
    process p's rows are rows p, p + P, … of the single-process batch."""
    single = iter(pipeline.training_dataset(images, index, tokenizer, _config(seed=3)))
    shards = [iter(pipeline.training_dataset(images, index, tokenizer, _config(seed=3), p, 3))
              for p in range(3)]
    for _ in range(6):
        whole = next(single)
        parts = [next(s) for s in shards]
        for key, value in flat(whole).items():
            for p, part in enumerate(parts):
                assert flat(part)[key].shape[1:] == value.shape[1:], key
                np.testing.assert_array_equal(flat(part)[key], value[p::3], err_msg=key)


def test_vmlm_predictions_are_capped():
    rng = np.random.default_rng(0)
    ids = np.arange(1, 17)[None].repeat(50, 0)
    _, labels = masking.mask_text(ids, np.ones_like(ids), rng, 99, (5, 10), mask_prob=0.9,
                                  max_predictions=masking.max_predictions(16))
    per_row = (labels != -1).sum(1)
    assert per_row.max() == 8 and per_row.min() >= 1
