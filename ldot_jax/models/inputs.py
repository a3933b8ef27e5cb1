"""Checks of model inputs, run before anything is compiled.

Shape checks run at trace time (inside `jit` too). Value checks (token ids inside the
vocabulary, 0/1 masks, prefix masks) need concrete arrays: they run when the model is applied
eagerly and are skipped under `jit`, where the input pipeline is responsible for the values.
Every failure is a ValueError naming the argument and what was seen.
"""

from __future__ import annotations

from typing import Mapping

import jax
import numpy as np

from ldot_jax.models.config import PixelConfig, RegionConfig, TransformerConfig


def concrete_value(x) -> np.ndarray | None:
    """The NumPy value of `x`, or None when `x` is a tracer (inside jit / grad)."""
    try:
        return np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def _shape(name, x, rank):
    if not hasattr(x, "shape") or len(x.shape) != rank:
        shape = getattr(x, "shape", type(x).__name__)
        raise ValueError(f"{name}: expected a rank-{rank} array, got shape {shape}")
    return tuple(x.shape)


def _check_binary(name, x):
    value = concrete_value(x)
    if value is not None and value.size and not np.isin(value, (0, 1)).all():
        bad = np.unique(value[~np.isin(value, (0, 1))])[:5]
        raise ValueError(f"{name}: expected 0/1 (or bool) values, found {bad.tolist()}")
    return value


def check_prefix_mask(name, mask):
    """Packed sequences need masks of the form 1…1 0…0 per row (checked when concrete)."""
    value = concrete_value(mask)
    if value is None or value.size == 0:
        return
    value = value.astype(bool)
    rows = np.nonzero((np.diff(value.astype(np.int8), axis=1) > 0).any(axis=1))[0]
    if rows.size:
        raise ValueError(f"{name}: rows {rows[:5].tolist()} have padding before a real "
                         f"element; expected 1…1 0…0 per row")


def check_text(input_ids, attention_mask, config: TransformerConfig,
               ids_name="input_ids", mask_name="attention_mask"):
    """input_ids: int[B, L] in [0, vocab); attention_mask: [B, L] of 0/1; L ≤ max positions."""
    ids_shape = _shape(ids_name, input_ids, 2)
    mask_shape = _shape(mask_name, attention_mask, 2)
    if ids_shape != mask_shape:
        raise ValueError(f"{mask_name} has shape {mask_shape} but {ids_name} has shape "
                         f"{ids_shape}; they must match")
    if not np.issubdtype(input_ids.dtype, np.integer):
        raise ValueError(f"{ids_name}: expected integer token ids, got dtype {input_ids.dtype}")
    if ids_shape[1] > config.max_position_embeddings:
        raise ValueError(f"{ids_name}: length {ids_shape[1]} exceeds max_position_embeddings="
                         f"{config.max_position_embeddings}")
    ids = concrete_value(input_ids)
    if ids is not None and ids.size:
        outside = (ids < 0) | (ids >= config.vocab_size)
        if outside.any():
            raise ValueError(
                f"{ids_name}: token ids {np.unique(ids[outside])[:5].tolist()} are outside the "
                f"vocabulary [0, {config.vocab_size})")
    _check_binary(mask_name, attention_mask)


def check_regions(region_feat, boxes, region_mask, config: RegionConfig,
                  masked_regions=None):
    """region_feat: f[B, R, feat_dim]; boxes: f[B, R, box_dim]; region_mask: [B, R] of 0/1;
    masked_regions (SMRM): [B, R] of 0/1 or None."""
    feat_shape = _shape("region_feat", region_feat, 3)
    if feat_shape[2] != config.feat_dim:
        raise ValueError(f"region_feat: last dimension is {feat_shape[2]}, the model expects "
                         f"feat_dim={config.feat_dim} (shape {feat_shape})")
    box_shape = _shape("boxes", boxes, 3)
    if box_shape != feat_shape[:2] + (config.box_dim,):
        raise ValueError(f"boxes has shape {box_shape}, expected "
                         f"{feat_shape[:2] + (config.box_dim,)} to match region_feat "
                         f"{feat_shape} and box_dim={config.box_dim}")
    mask_shape = _shape("region_mask", region_mask, 2)
    if mask_shape != feat_shape[:2]:
        raise ValueError(f"region_mask has shape {mask_shape}, expected {feat_shape[:2]} to "
                         f"match region_feat {feat_shape}")
    _check_binary("region_mask", region_mask)
    if masked_regions is not None:
        masked_shape = _shape("masked_regions", masked_regions, 2)
        if masked_shape != feat_shape[:2]:
            raise ValueError(f"masked_regions has shape {masked_shape}, expected "
                             f"{feat_shape[:2]} to match region_feat {feat_shape}")
        _check_binary("masked_regions", masked_regions)


def check_batch_sizes(**arrays):
    """All named arrays share their leading (batch) dimension."""
    sizes = {name: x.shape[0] for name, x in arrays.items()}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"batch sizes differ: {sizes}")


# ---------------------------------------------------------------------------------------------
# The inputs' fields (only the towers and the collate of their inputs read them)

TEXT_FIELDS = ("input_ids", "attention_mask")
REGION_FIELDS = ("region_feat", "boxes", "region_mask")
PIXEL_FIELDS = ("pixels",)


def _fields(pytree, names: tuple[str, ...], what: str) -> tuple:
    if not isinstance(pytree, Mapping):
        raise ValueError(f"{what}: expected a dict with {list(names)}, got "
                         f"{type(pytree).__name__}")
    missing = [n for n in names if n not in pytree]
    if missing:
        raise ValueError(f"{what}: missing {missing}; it has {sorted(pytree)} (expected "
                         f"{list(names)})")
    return tuple(pytree[n] for n in names)


def text_fields(text) -> tuple:
    """(input_ids, attention_mask) of a text input pytree (a ValueError names what is missing)."""
    return _fields(text, TEXT_FIELDS, "text input")


def region_fields(image) -> tuple:
    """(region_feat, boxes, region_mask) of a region image input pytree."""
    return _fields(image, REGION_FIELDS, "image input (regions)")


def pixel_fields(image):
    """The uint8[B, S, S, 3] pixels of a pixel image input {"pixels": …}."""
    return _fields(image, PIXEL_FIELDS, "image input (pixels)")[0]


def check_pixels(pixels, config: PixelConfig) -> None:
    """uint8[B, image_size, image_size, 3] (shape and dtype, at trace time)."""
    shape = tuple(getattr(pixels, "shape", ()))
    want = (config.image_size, config.image_size, 3)
    if len(shape) != 4 or shape[1:] != want:
        raise ValueError(f"pixels: expected shape [B, {', '.join(map(str, want))}] (uint8 RGB, "
                         f"resized and center-cropped to image_size={config.image_size}), got "
                         f"{shape}")
    if pixels.dtype != np.uint8:
        raise ValueError(f"pixels: expected uint8 RGB values (the tower normalizes them), got "
                         f"dtype {pixels.dtype}")
