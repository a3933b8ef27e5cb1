"""Image files as data: JSONL / Karpathy datasets with images/ beside or instead of features/
(pictures decoded once at preparation, in worker processes, equal to data/images.load_pixels),
bad pictures reported together by name before any dataset exists (or skipped), and pixel
records through the training and evaluation pipelines as {"pixels": uint8[B, S, S, 3]}."""

import json
import logging
import os

import numpy as np
import pytest
from PIL import Image

from ldot_jax.data import batching, datasets, images, pipeline
from fixture_files import FEAT_DIM, write_karpathy, write_region_npz

SIZE = 16


def _picture(path, width, height, seed, mode="RGB", fmt=None):
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    image = Image.fromarray(array).convert(mode)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    image.save(path, fmt)


def _jsonl(root, split, lines):
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, f"{split}.jsonl"), "w") as f:
        f.write("".join(json.dumps(line) + "\n" for line in lines))


def _collection(root):
    """4 images: named by a line's "image" (in a subfolder), found by id (.png, .JPG), one
    grayscale, one CMYK JPEG, one gallery-only."""
    _picture(root / "images" / "sub" / "cat.jpeg", 40, 30, 0)
    _picture(root / "images" / "dog.png", 25, 50, 1, "L")
    _picture(root / "images" / "bird.JPG", 30, 30, 2, "CMYK", "JPEG")
    _picture(root / "images" / "tree.png", 64, 20, 3, "RGBA")
    _jsonl(root, "train", [
        {"image_id": "cat", "caption": "a cat", "image": "sub/cat.jpeg"},
        {"image_id": "dog", "caption": "a dog"}, {"image_id": "cat", "caption": "the cat"},
        {"image_id": "bird", "caption": "a bird"}, {"image_id": "tree"}])
    return {"cat": "sub/cat.jpeg", "dog": "dog.png", "bird": "bird.JPG", "tree": "tree.png"}


def test_jsonl_pictures_only(tmp_path):
    root = tmp_path / "mine"
    files = _collection(root)
    data = datasets.load("jsonl", data_dir=str(tmp_path / "o"), manual_dir=str(root),
                         feat_dim=0, image_size=SIZE, workers=2)
    assert data.spec.feat_dim == 0 and data.spec.image_size == SIZE
    train = data.split("train")
    assert len(train) == 4
    for i, (image_id, name) in enumerate(files.items()):
        record = train[i]
        assert record["image_id"].decode() == image_id and "region_feat" not in record
        np.testing.assert_array_equal(record["image"],
                                      images.load_pixels(root / "images" / name, SIZE))
    assert [c.decode() for c in train[0]["captions"]] == ["a cat", "the cat"]
    table = data.caption_table("train")
    assert table[0] == {"captions": ["a cat", "the cat"]}
    # Through the pipeline as the ViT's input.
    captions = pipeline.tokenize_captions(table, _Words(), None, "truncate",
                                          image_input="pixels")
    batch = next(pipeline.eval_image_batches(train, 3, (16,), image_input="pixels"))
    assert batch["image"]["pixels"].shape == (3, SIZE, SIZE, 3)
    assert batch["image"]["pixels"].dtype == np.uint8
    np.testing.assert_array_equal(batch["image"]["pixels"][1], train[1]["image"])
    source = pipeline.CaptionSource(train, captions, "pixels")
    example = source[2]  # "a dog"
    np.testing.assert_array_equal(example["image"]["pixels"], train[1]["image"])


class _Words:
    """A stand-in tokenizer: one id per word, [CLS] 1 / [SEP] 2."""

    cls_id, sep_id, vocab_size = 1, 2, 100

    def encode_batch(self, texts, max_length=None, policy="truncate"):
        return [[1] + [3 + len(w) for w in t.split()] + [2] for t in texts]


def test_regions_and_pictures_together(tmp_path):
    root = tmp_path / "flickr"
    entries = write_karpathy(str(root), "flickr30k", {"train": 2, "val": 1, "test": 2})
    for n, image in enumerate(entries):
        _picture(root / "images" / image["filename"], 20 + n, 24, n, fmt="JPEG")
    data = datasets.load("karpathy", config="flickr30k", data_dir=str(tmp_path / "o"),
                         manual_dir=str(root), feat_dim=FEAT_DIM, image_size=SIZE)
    record = data.split("test")[1]
    assert record["region_feat"].shape[1] == FEAT_DIM
    np.testing.assert_array_equal(
        record["image"], images.load_pixels(root / "images" / entries[4]["filename"], SIZE))
    assert data.spec.feat_dim == FEAT_DIM and data.spec.image_size == SIZE


def test_karpathy_coco_names_carry_their_folder(tmp_path):
    root = tmp_path / "coco"
    entries = write_karpathy(str(root), "coco", {"train": 1, "val": 1, "test": 1})
    with open(root / "dataset_coco.json") as f:
        annotations = json.load(f)
    for n, image in enumerate(annotations["images"]):
        image["filepath"] = "val2014"
        _picture(root / "images" / "val2014" / image["filename"], 30, 20, n)
    with open(root / "dataset_coco.json", "w") as f:
        json.dump(annotations, f)
    data = datasets.load("karpathy", config="coco", data_dir=str(tmp_path / "o"),
                         manual_dir=str(root), feat_dim=0, image_size=SIZE)
    np.testing.assert_array_equal(
        data.split("test")[0]["image"],
        images.load_pixels(root / "images" / "val2014" / entries[2]["filename"], SIZE))


def test_bad_pictures_are_all_named_before_any_dataset_exists(tmp_path, caplog):
    root = tmp_path / "mine"
    _collection(root)
    (root / "images" / "dog.png").write_bytes(b"")                       # empty
    good = (root / "images" / "bird.JPG").read_bytes()
    (root / "images" / "bird.JPG").write_bytes(good[:len(good) // 3])    # truncated
    os.remove(root / "images" / "tree.png")                              # missing
    out = tmp_path / "o"
    with pytest.raises(images.BadImageError) as error:
        datasets.load("jsonl", data_dir=str(out), manual_dir=str(root), feat_dim=0,
                      image_size=SIZE, workers=2)
    message = str(error.value)
    assert "3 of 4 pictures cannot be read" in message
    for name, why in (("dog.png", "empty file"), ("bird.JPG", "truncated"),
                      ("tree.{jpg,jpeg,png", "no such image file")):
        assert name in message and why in message, message
    assert "bad_images='skip'" in message
    builder = datasets.make_builder("jsonl", None, str(out), feat_dim=0, image_size=SIZE)
    assert not builder.is_prepared()
    # Skipping leaves them out, with a warning naming them.
    with caplog.at_level(logging.WARNING):
        data = datasets.load("jsonl", data_dir=str(tmp_path / "skip"), manual_dir=str(root),
                             feat_dim=0, image_size=SIZE, bad_images="skip", workers=1)
    assert [r["image_id"].decode() for r in data.split("train")] == ["cat"]
    assert "dog.png" in caplog.text and "left out" in caplog.text
    # Fixed files: the failed preparation left nothing in the way.
    _collection(root)
    data = datasets.load("jsonl", data_dir=str(out), manual_dir=str(root), feat_dim=0,
                         image_size=SIZE)
    assert len(data.split("train")) == 4


def test_bad_picture_settings_and_names(tmp_path):
    root = tmp_path / "mine"
    _collection(root)
    with pytest.raises(ValueError, match="bad_images='ignore'"):
        datasets.load("jsonl", data_dir=str(tmp_path / "o"), manual_dir=str(root),
                      feat_dim=0, image_size=SIZE, bad_images="ignore")
    with pytest.raises(ValueError, match="regions .* pictures .* both are 0"):
        datasets.load("jsonl", data_dir=str(tmp_path / "o2"), manual_dir=str(root),
                      feat_dim=0)
    for bad in ("/etc/passwd", "../x.png", ""):
        _jsonl(root, "train", [{"image_id": "cat", "caption": "c", "image": bad}])
        with pytest.raises(ValueError, match="train.jsonl:1: 'image' must be a file name"):
            datasets.load("jsonl", data_dir=str(tmp_path / "o3"), manual_dir=str(root),
                          feat_dim=0, image_size=SIZE)
    _jsonl(root, "train", [{"image_id": "cat", "image": "a.png"},
                           {"image_id": "cat", "image": "b.png"}])
    with pytest.raises(ValueError, match="train.jsonl:2: image 'cat' names picture 'b.png'"):
        datasets.load("jsonl", data_dir=str(tmp_path / "o4"), manual_dir=str(root),
                      feat_dim=0, image_size=SIZE)
    # Another size is another dataset (its own directory); the worker count is how, not
    # what: another count reuses the data.
    _collection(root)
    small = datasets.load("jsonl", data_dir=str(tmp_path / "o5"), manual_dir=str(root),
                          feat_dim=0, image_size=SIZE, workers=2)
    large = datasets.load("jsonl", data_dir=str(tmp_path / "o5"), manual_dir=str(root),
                          feat_dim=0, image_size=SIZE * 2)
    assert large.directory != small.directory
    assert large.split("train")[0]["image"].shape == (SIZE * 2, SIZE * 2, 3)
    again = datasets.load("jsonl", data_dir=str(tmp_path / "o5"), manual_dir=str(root),
                          feat_dim=0, image_size=SIZE, workers=1)
    assert again.directory == small.directory


def test_pixel_collate_checks():
    good = {"pixels": np.zeros((4, 4, 3), np.uint8)}
    batch = batching.collate_pixels([good, good], batch_size=3)
    assert batch["pixels"].shape == (3, 4, 4, 3)
    assert len(batching.split_pixels(batch)) == 3
    with pytest.raises(ValueError, match="example 1 has pixels of shape"):
        batching.collate_pixels([good, {"pixels": np.zeros((5, 5, 3), np.uint8)}])
    with pytest.raises(ValueError, match="example 1 has pixels of dtype float32"):
        batching.collate_pixels([good, {"pixels": np.zeros((4, 4, 3), np.float32)}])
    with pytest.raises(ValueError, match="expected .S, S, 3."):
        batching.collate_pixels([{"pixels": np.zeros((4, 5, 3), np.uint8)}])
    with pytest.raises(ValueError, match="has no picture"):
        batching.image_input("pixels").from_record({"image_id": "x", "region_feat": 0})


def test_bench_images_runs_and_reports(tmp_path):
    """`ldot bench images` (decode vs stored pictures, BENCHMARKS.md) on a few small files."""
    from ldot_jax.bench import images as bench_images

    out = tmp_path / "images.json"
    assert bench_images.main(["--count", "6", "--width", "40", "--height", "30", "--size",
                              "16", "--workers", "1", "--batch_size", "4", "--vit_steps", "0",
                              "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["count"] == 6 and result["stored_bytes_per_image"] == 16 * 16 * 3
    assert all(result[k] > 0 for k in ("decode_per_core", "prepare", "read"))
