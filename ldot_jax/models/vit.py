"""The ViT image tower (open_clip's VisionTransformer): pixels → patch tokens and a vector.

uint8 RGB [B, S, S, 3] → (x / 255 − mean) / std → non-overlapping p × p patches, each
linearly embedded ("conv1", no bias) → [class token; patches] + learned positions → LN_pre →
pre-LN blocks → LN_post → pool (class token, or the patches' mean) → `proj` (no bias).
With PixelConfig.stem "conv", the patch embedding is a convolutional stem instead (ConvStem).

Params (open_clip's `visual.*` names): visual/{conv1/kernel [p, p, 3, W], class_embedding [W],
positional_embedding [1 + g², W] (g = S / p), ln_pre, transformer/resblocks_{n}/…, ln_post},
proj [W, P]; the conv stem's: visual/stem/{conv_{i} [3, 3, C_{i-1}, C_i], norm_{i}, proj
[C_k, W]} in place of conv1.

Shapes: B batch, S image side, p patch, g patches per side, W width, P projection dim.
"""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from ldot_jax.core import numerics
from ldot_jax.models.config import PixelConfig, TransformerConfig
from ldot_jax.models.inputs import check_pixels, pixel_fields
from ldot_jax.models.layers import layer_norm
from ldot_jax.models.outputs import TowerOutput
from ldot_jax.models.prenorm import PreLNEncoder

def normalize_pixels(pixels, config: PixelConfig):
    """uint8[B, S, S, 3] → f32[B, S, S, 3]: (x / 255 − mean) / std, as torchvision's ToTensor
    and Normalize."""
    mean = jnp.asarray(config.mean, jnp.float32)
    std = jnp.asarray(config.std, jnp.float32)
    return (pixels.astype(jnp.float32) / 255.0 - mean) / std


def _batch_reshape(x, shape):
    """x.reshape(shape) keeping dim 0's sharding (a [B@data, …] batch under a mesh with
    Explicit axes: JAX cannot infer the output sharding of a reshape that splits or merges
    several other dims)."""
    spec = tuple(jax.typeof(x).sharding.spec)
    if all(axis is None for axis in spec):
        return x.reshape(shape)
    return jax.lax.reshape(x, shape, out_sharding=P(spec[0], *([None] * (len(shape) - 1))))


class PatchEmbed(nn.Module):
    """Non-overlapping p × p patches → W features: a stride-p convolution without bias,
    computed as one matmul over the flattened (row, column, channel) patch (no convolution
    sharding rules needed under a mesh)."""

    config: TransformerConfig
    patch_size: int

    @nn.compact
    def __call__(self, images):
        """images: f[B, S, S, 3] → [B, g², W]."""
        c, p = self.config, self.patch_size
        batch, side, _, channels = images.shape
        g = side // p
        kernel = self.param("kernel", nn.initializers.lecun_normal(),
                            (p, p, channels, c.hidden_size), c.params_dtype)
        patches = _batch_reshape(images, (batch, g, p, g, p, channels))
        patches = _batch_reshape(patches.transpose(0, 1, 3, 2, 4, 5),
                                 (batch, g * g, p * p * channels)).astype(c.compute_dtype)
        return patches @ kernel.reshape(p * p * channels, c.hidden_size).astype(c.compute_dtype)


def conv3x3_stride2(x, kernel):
    """f[B, H, H, C] x [3, 3, C, D] → [B, H/2, H/2, D]: a 3 × 3 convolution with stride 2 and
    zero padding 1 (lax.conv_general_dilated's), as 9 strided slices and one matmul. Under a
    mesh with Explicit axes JAX has no sharding rule for a convolution's kernel gradient; slices
    and a matmul keep the batch sharding with none needed."""
    side, channels = x.shape[1], x.shape[3]
    if side % 2:
        raise ValueError(f"conv3x3_stride2: image side {side} is odd")
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    taps = [padded[:, dy:dy + side:2, dx:dx + side:2] for dy in range(3) for dx in range(3)]
    return jnp.concatenate(taps, axis=-1) @ kernel.reshape(9 * channels, kernel.shape[-1])


class ConvStem(nn.Module):
    """Xiao et al. 2021 ("Early convolutions help transformers see better"): in place of the
    linear p × p patch embedding, log2(p) 3 × 3 stride-2 convolutions, each followed by a
    LayerNorm over channels (their BatchNorm would need batch statistics in the params) and
    GELU, then a 1 × 1 projection to the width: the same g × g grid of tokens, each seeing
    overlapping neighbourhoods."""

    config: TransformerConfig
    pixels: PixelConfig

    def channels(self) -> tuple:
        pc, width = self.pixels, self.config.hidden_size
        depth = pc.conv_layers
        return pc.stem_channels or tuple(max(8, width >> (depth - 1 - i))
                                         for i in range(depth))

    @nn.compact
    def __call__(self, images):
        """images: f[B, S, S, 3] → [B, g², W]."""
        c = self.config
        x = images.astype(c.compute_dtype)
        for i, out in enumerate(self.channels()):
            kernel = self.param(f"conv_{i}", nn.initializers.lecun_normal(),
                                (3, 3, x.shape[-1], out), c.params_dtype)
            x = nn.gelu(layer_norm(c, f"norm_{i}")(conv3x3_stride2(x, kernel.astype(x.dtype))),
                        approximate=False)
        batch, grid, _, channels = x.shape
        x = _batch_reshape(x, (batch, grid * grid, channels))
        proj = self.param("proj", nn.initializers.lecun_normal(), (channels, c.hidden_size),
                          c.params_dtype)
        return x @ proj.astype(x.dtype)


class VisionTransformer(nn.Module):
    """The ViT trunk: pixels → LN_post(states) [B, 1 + g², W] (class token first)."""

    config: TransformerConfig
    pixels: PixelConfig

    @nn.compact
    def __call__(self, pixels, deterministic: bool = True):
        """pixels: uint8[B, S, S, 3] → [B, 1 + g², W]."""
        c, pc = self.config, self.pixels
        check_pixels(pixels, pc)
        width, scale = c.hidden_size, c.hidden_size ** -0.5
        images = normalize_pixels(pixels, pc)
        if pc.stem == "conv":
            x = ConvStem(c, pc, name="stem")(images)
        else:
            x = PatchEmbed(c, pc.patch_size, name="conv1")(images)
        cls = self.param("class_embedding", nn.initializers.normal(scale), (width,),
                         c.params_dtype)
        positions = self.param("positional_embedding", nn.initializers.normal(scale),
                               (pc.grid ** 2 + 1, width), c.params_dtype)
        # The class token built from x, so it is sharded like the batch under a mesh.
        first = jnp.zeros_like(x[:, :1]) + cls.astype(x.dtype)
        x = jnp.concatenate([first, x], axis=1) + positions.astype(x.dtype)
        x = layer_norm(c, "ln_pre")(x)
        mask = jnp.ones(x.shape[:2], jnp.int32)
        x = PreLNEncoder(c, name="transformer")(x, mask, deterministic)
        return layer_norm(c, "ln_post")(x)


class ViTTower(nn.Module):
    """The pixel image tower: a ViT, pooled and projected.

    TowerOutput: sequence = the ViT's last states [B, 1 + g², W] (class token, then the patch
    tokens the patch re-ranker reads, row-major over the grid); mask all ones; cls_state =
    sequence[:, 0]; embedding = proj(pool) f32[B, P], L2-normalized if `normalize`.
    """

    config: TransformerConfig
    pixels: PixelConfig
    project_dim: int
    normalize: bool = False

    @nn.compact
    def __call__(self, image: Mapping[str, Any], masked_regions=None,
                 deterministic: bool = True):
        if masked_regions is not None:
            raise ValueError("the ViT image tower has no regions to mask (masked_regions is "
                             "for the region tower's SMRM)")
        c = self.config
        states = VisionTransformer(c, self.pixels, name="visual")(pixel_fields(image),
                                                                  deterministic)
        pooled = states[:, 0] if self.pixels.pool == "tok" else states[:, 1:].mean(axis=1)
        proj = self.param("proj", nn.initializers.normal(c.hidden_size ** -0.5),
                          (c.hidden_size, self.project_dim), c.params_dtype)
        embedding = (pooled @ proj.astype(pooled.dtype)).astype(jnp.float32)
        if self.normalize:
            embedding = numerics.l2_normalize(embedding)
        mask = jnp.ones(states.shape[:2], bool)
        return TowerOutput(states, mask, states[:, 0], embedding)


def patch_boxes(grid: int) -> np.ndarray:
    """f32[1 + g², 7]: the boxes [x1, y1, x2, y2, w, h, w·h] (normalized) of a ViT's tokens as
    regions: the class token covers the whole image, then the g × g patch cells row-major."""
    rows, cols = np.divmod(np.arange(grid * grid), grid)
    side = 1.0 / grid
    cells = np.stack([cols * side, rows * side, (cols + 1) * side, (rows + 1) * side,
                      np.full(grid * grid, side), np.full(grid * grid, side),
                      np.full(grid * grid, side * side)], axis=1)
    return np.concatenate([[[0, 0, 1, 1, 1, 1, 1]], cells]).astype(np.float32)


def tokens_as_regions(states, grid: int) -> dict:
    """A ViT's states [B, 1 + g², W] as a region input {"region_feat": [B, 1 + g², W],
    "boxes": f32[B, 1 + g², 7] (patch_boxes), "region_mask": i32[B, 1 + g²] all ones}."""
    boxes = jnp.asarray(patch_boxes(grid))
    ones = jnp.ones_like(states[..., 0], jnp.int32)  # sharded like the batch
    return {"region_feat": states, "boxes": ones[..., None] * boxes,
            "region_mask": ones}


def dummy_pixels(config: PixelConfig, batch: int = 1) -> dict:
    """The smallest pixel image input (shape inference)."""
    return {"pixels": jnp.zeros((batch, config.image_size, config.image_size, 3), jnp.uint8)}


def resize_positional_embedding(positions, grid: int) -> np.ndarray:
    """positional_embedding [1 + g₀², W] → [1 + grid², W]: the patch positions resized as a
    g₀ × g₀ image by bicubic interpolation (jax.image.resize, as big_vision does; antialiased
    when shrinking), the class token's row kept. Same grid: unchanged."""
    positions = np.asarray(positions)
    count, width = positions.shape
    old = int(round(np.sqrt(count - 1)))
    if old * old != count - 1:
        raise ValueError(f"positional_embedding has {count} rows: expected 1 + g² (a square "
                         f"patch grid)")
    if old == grid:
        return positions
    patches = positions[1:].reshape(old, old, width).astype(np.float32)
    resized = jax.image.resize(patches, (grid, grid, width), method="bicubic")
    return np.concatenate([positions[:1], np.asarray(resized).reshape(grid * grid, width)])
