"""VMLM / SMRM masking statistics and bucketed batches."""

import numpy as np
import pytest

from ldot_jax.data import batching, masking

MASK, LOW, HIGH = 103, 106, 1000


def text_batch(rng, rows=4000, width=40):
    lengths = rng.integers(3, width + 1, size=rows)  # ≥ 1 wordpiece between [CLS] and [SEP]
    mask = (np.arange(width)[None] < lengths[:, None]).astype(np.int32)
    ids = rng.integers(LOW, HIGH, size=(rows, width)) * mask
    ids[:, 0] = 101
    ids[np.arange(rows), lengths - 1] = 102
    return ids, mask, lengths


def test_vmlm_statistics_and_invariants():
    rng = np.random.default_rng(0)
    ids, mask, lengths = text_batch(rng)
    masked, labels = masking.mask_text(ids, mask, np.random.default_rng(1), MASK, (LOW, HIGH))
    selected = labels != -1
    rows = np.arange(len(ids))
    # Never [CLS], [SEP] or padding; at least one per caption; labels are the originals.
    assert not selected[:, 0].any() and not selected[rows, lengths - 1].any()
    assert not (selected & (mask == 0)).any()
    assert selected.any(axis=1).all()
    np.testing.assert_array_equal(labels[selected], ids[selected])
    np.testing.assert_array_equal(masked[~selected], ids[~selected])
    # 15% of wordpieces (a little more: short captions get their forced one), then 80/10/10.
    wordpieces = (lengths - 2).sum()
    rate = selected.sum() / wordpieces
    assert 0.15 < rate < 0.17, rate
    to_mask = (masked[selected] == MASK).mean()
    kept = (masked[selected] == ids[selected]).mean()
    assert abs(to_mask - 0.8) < 0.015 and abs(kept - 0.1 - 1 / (HIGH - LOW) * 0.1) < 0.015
    replaced = masked[selected & (masked != MASK) & (masked != ids)]
    assert ((replaced >= LOW) & (replaced < HIGH)).all()


def test_vmlm_is_deterministic_per_seed():
    ids, mask, _ = text_batch(np.random.default_rng(0), rows=50)
    a = masking.mask_text(ids, mask, np.random.default_rng(7), MASK, (LOW, HIGH))
    b = masking.mask_text(ids, mask, np.random.default_rng(7), MASK, (LOW, HIGH))
    c = masking.mask_text(ids, mask, np.random.default_rng(8), MASK, (LOW, HIGH))
    np.testing.assert_array_equal(a[1], b[1])
    assert (a[1] != c[1]).any()


def test_smrm_statistics():
    rng = np.random.default_rng(0)
    counts = rng.integers(1, 37, size=3000)
    real = np.arange(36)[None] < counts[:, None]
    masked = masking.mask_regions(real.astype(np.int32), np.random.default_rng(2))
    assert not (masked & ~real).any()
    assert masked.any(axis=1).all()
    assert 0.15 < masked.sum() / real.sum() < 0.17
    single = masking.mask_regions(np.array([[1, 0, 0]]), np.random.default_rng(0))
    np.testing.assert_array_equal(single, [[True, False, False]])


def example(n_tokens, n_regions, image, text, feat_dim=5, classes=3):
    return {"input_ids": [101] + [7] * (n_tokens - 2) + [102],
            "image": {"region_feat": np.full((n_regions, feat_dim), text, np.float32),
                      "boxes": np.ones((n_regions, 7), np.float32)},
            "soft_labels": np.ones((n_regions, classes), np.float32) / classes,
            "image_index": image, "text_index": text}


def test_collate_pads_to_buckets():
    batch = batching.collate([example(5, 3, 0, 0), example(9, 10, 0, 1), example(4, 1, 2, 2)],
                             text_buckets=(8, 16, 32), image_buckets=(10, 20), batch_size=4)
    text, image = batch["text"], batch["image"]
    assert text["input_ids"].shape == (4, 16) and image["region_feat"].shape == (4, 10, 5)
    assert batch["soft_labels"].shape == (4, 10, 3)
    np.testing.assert_array_equal(batch["text"]["attention_mask"].sum(1), [5, 9, 4, 0])
    np.testing.assert_array_equal(batch["image"]["region_mask"].sum(1), [3, 10, 1, 0])
    np.testing.assert_array_equal(batch["valid"], [True, True, True, False])
    assert (image["region_feat"][1, :10] == 1).all() and (image["region_feat"][0, 3:] == 0).all()
    np.testing.assert_array_equal(batching.same_image(batch["image_index"]),
                                  [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]])


def test_collate_errors():
    with pytest.raises(ValueError, match=r"caption length .* 40 exceeds the largest bucket 32"):
        batching.collate([example(40, 3, 0, 0)], (16, 32), (10,))
    with pytest.raises(ValueError, match="region count 11 exceeds the largest bucket 10"):
        batching.collate([example(4, 11, 0, 0)], (16,), (10,))
    with pytest.raises(ValueError, match="example 1 has region features of dim 6"):
        batching.collate([example(4, 2, 0, 0), example(4, 2, 0, 1, feat_dim=6)], (16,), (10,))
    with pytest.raises(ValueError, match="3 examples exceed batch_size=2"):
        batching.collate([example(4, 2, 0, i) for i in range(3)], (16,), (10,), batch_size=2)
