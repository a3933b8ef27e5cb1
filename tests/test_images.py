"""data/images.py: image files → pixels equal to open_clip's eval preprocessing (fixture:
tests/data/open_clip/make_image_fixture.py), the converted open_clip model on them equal to
open_clip's embeddings, and bad files (empty, not an image, truncated, decompression bombs,
zero-size, missing) named in a clear error; wide-range modes converted, not clipped."""

import io
import pathlib
import struct
import zlib

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import ldot_jax
from ldot_jax.checkpoints import convert
from ldot_jax.data import images
from ldot_jax.models.dual_encoder import DualEncoder

HERE = pathlib.Path(__file__).parent / "data" / "open_clip"
MEAN = np.array((0.48145466, 0.4578275, 0.40821073))
STD = np.array((0.26862954, 0.26130258, 0.27577711))


@pytest.fixture(scope="module")
def fixture():
    with np.load(HERE / "images.npz") as data:
        return {k: data[k] for k in data.files}


@pytest.mark.parametrize("size", [32, 24])
def test_pixels_equal_open_clip_transform(fixture, size):
    for row, name in enumerate(fixture["names"]):
        path = HERE / "images" / str(name)
        pixels = images.load_pixels(path, size)
        assert pixels.shape == (size, size, 3) and pixels.dtype == np.uint8, name
        # open_clip's tensors are (x / 255 − mean) / std of exactly these uint8 values.
        reference = fixture[f"pixels_{size}"][row]
        np.testing.assert_array_equal(np.rint((reference * STD + MEAN) * 255), pixels,
                                      err_msg=str(name))
        np.testing.assert_allclose((pixels / 255.0 - MEAN) / STD, reference, atol=1e-6)
        # From the file's bytes the same.
        np.testing.assert_array_equal(images.load_pixels(path.read_bytes(), size), pixels)


def test_converted_model_on_files_equals_open_clip(fixture, tmp_path):
    with np.load(HERE / "small_clip.npz") as data:
        np.savez(tmp_path / "clip.npz", **{k[len("state/"):]: data[k] for k in data.files
                                           if k.startswith("state/")})
    out = convert.convert_checkpoint("open_clip", tmp_path / "clip.npz", tmp_path / "model",
                                     activation="quick_gelu", num_heads=4, text_num_heads=2)
    model, params = ldot_jax.load_dual_encoder(out)
    pixels = np.stack([images.load_pixels(HERE / "images" / str(n), 32)
                       for n in fixture["names"]])
    embedding = model.apply({"params": params}, {"pixels": jnp.asarray(pixels)},
                            method=DualEncoder.encode_image)
    np.testing.assert_allclose(embedding, fixture["image_features_32"], atol=1e-5)
    # The README's own-images path: the pictures indexed, a caption's vector as the query.
    index = ldot_jax.ExactIndex(embedding.shape[1]).add(np.asarray(embedding),
                                                        np.arange(len(pixels)))
    with np.load(HERE / "small_clip.npz") as data:
        ids, lengths = data["text"].astype(np.int32), data["lengths"]
    mask = (np.arange(ids.shape[1])[None] < lengths[:, None]).astype(np.int32)
    query = model.apply({"params": params}, {"input_ids": ids, "attention_mask": mask},
                        method=DualEncoder.encode_text)
    hits = index.search(np.asarray(query), k=3)
    want = np.argsort(-(np.asarray(query) @ np.asarray(embedding).T), axis=1,
                      kind="stable")[:, :3]
    np.testing.assert_array_equal(hits.ids, want)


def _png(width, height, mode="RGB"):
    buffer = io.BytesIO()
    Image.new(mode, (width, height), 90).save(buffer, "PNG")
    return buffer.getvalue()


def _with_png_size(data: bytes, width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width × height (CRC recomputed), pixel data unchanged."""
    start = 8 + 8  # signature, then the IHDR chunk's length and type
    ihdr = struct.pack(">II", width, height) + data[start + 8:start + 13]
    crc = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr) & 0xFFFFFFFF)
    return data[:start] + ihdr + crc + data[start + 17:]


def test_bad_images_name_the_file(tmp_path):
    good = HERE / "images" / "landscape_rgb.png"
    jpeg = (HERE / "images" / "portrait_rgb.jpg").read_bytes()
    cases = {
        "empty.png": (b"", "empty file"),
        "notes.jpg": (b"a caption, not a picture\n", "not an image"),
        "cut.jpg": (jpeg[:len(jpeg) // 2], "truncated"),
        "cut.png": (good.read_bytes()[:200], "truncated"),
        "bomb.png": (_with_png_size(_png(8, 8), 100_000, 100_000), "max_pixels"),
        "big.png": (_with_png_size(_png(8, 8), 10_000, 10_000), "exceeds max_pixels"),
        "zero.png": (_with_png_size(_png(8, 8), 0, 8), "not an image"),
    }
    for name, (data, message) in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(images.BadImageError, match=message) as error:
            images.load_pixels(path, 32)
        assert name in str(error.value), str(error.value)
    with pytest.raises(images.BadImageError, match="no such image file"):
        images.load_pixels(tmp_path / "missing.png", 32)
    # A configurable limit: a real 64 × 48 file over max_pixels=1000.
    with pytest.raises(images.BadImageError, match="64 × 48 = 3,072 pixels"):
        images.load_pixels(good, 32, max_pixels=1000)
    with pytest.raises(ValueError, match="image size must be positive"):
        images.load_pixels(good, 0)


def test_wide_modes_are_scaled_not_clipped(tmp_path):
    values = np.linspace(0, 65535, 40 * 30).reshape(30, 40).astype(np.uint16)
    path = tmp_path / "depth16.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I")
    pixels = images.load_pixels(path, 16)
    # Dark to bright, as the 16-bit values are; PIL's own RGB conversion would clip to 255.
    assert pixels.min() < 40 and pixels.max() > 215
    assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()
    floats = Image.fromarray(np.full((10, 10), 0.5, np.float32), "F")
    np.testing.assert_array_equal(images.to_pixels(floats, 4), np.full((4, 4, 3), 128))


def test_crop_pads_when_smaller_and_keeps_the_centre():
    # A 1-pixel-wide vertical line in the middle of a 9 × 5 picture stays in the middle.
    picture = np.zeros((5, 9, 3), np.uint8)
    picture[:, 4] = 255
    cropped = images.center_crop(Image.fromarray(picture), 5)
    assert np.asarray(cropped)[:, 2].min() == 255 and np.asarray(cropped).sum() == 255 * 15
    padded = np.asarray(images.center_crop(Image.fromarray(picture), 11))
    assert padded.shape == (11, 11, 3) and padded[0].sum() == 0 and padded[3:8, 5].min() == 255
