"""The ViT image tower (open_clip's VisionTransformer): pixels → patch tokens and a vector.

uint8 RGB [B, S, S, 3] → (x / 255 − mean) / std → non-overlapping p × p patches, each
linearly embedded ("conv1", no bias) → [class token; patches] + learned positions → LN_pre →
pre-LN blocks → LN_post → pool (class token, the patches' mean or max, or attention pooling)
→ `proj` (no bias). With PixelConfig.stem "conv" or "cnn", the patch embedding is a
convolutional stem instead (ConvStem, CnnStem).

Params (open_clip's `visual.*` names): visual/{conv1/kernel [p, p, 3, W], class_embedding [W],
positional_embedding [1 + g², W] (g = S / p), ln_pre, transformer/resblocks_{n}/…, ln_post},
proj [W, P]; the conv and cnn stems': visual/stem/{conv_{i} [3, 3, C_{i-1}, C_i], norm_{i},
proj [C_k, W]} in place of conv1; pool "map": map_head/… (MAPHead).

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
from ldot_jax.models.layers import attend, dense, layer_norm, max_over
from ldot_jax.models.outputs import TowerOutput
from ldot_jax.models.prenorm import Mlp, PreLNEncoder

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


def conv3x3(x, kernel, stride: int = 2):
    """f[B, H, H, C] x [3, 3, C, D] → [B, H/stride, H/stride, D]: a 3 × 3 convolution with
    stride 1 or 2 and zero padding 1 (lax.conv_general_dilated's), as 9 strided slices and one
    matmul. Under a mesh with Explicit axes JAX has no sharding rule for a convolution's kernel
    gradient; slices and a matmul keep the batch sharding with none needed."""
    side, channels = x.shape[1], x.shape[3]
    if stride not in (1, 2):
        raise ValueError(f"conv3x3: stride {stride}, expected 1 or 2")
    if side % stride:
        raise ValueError(f"conv3x3: image side {side} is odd (stride 2)")
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    taps = [padded[:, dy:dy + side:stride, dx:dx + side:stride]
            for dy in range(3) for dx in range(3)]
    return jnp.concatenate(taps, axis=-1) @ kernel.reshape(9 * channels, kernel.shape[-1])


def _conv_layer(module: nn.Module, c: TransformerConfig, i: int, x, out: int, stride: int):
    """conv_{i} (3 × 3, no bias) → norm_{i} (LayerNorm over channels) → GELU, as params of
    `module` (called inside its compact __call__)."""
    kernel = module.param(f"conv_{i}", nn.initializers.lecun_normal(),
                          (3, 3, x.shape[-1], out), c.params_dtype)
    x = conv3x3(x, kernel.astype(x.dtype), stride)
    return nn.gelu(layer_norm(c, f"norm_{i}")(x), approximate=False)


def _project_tokens(module: nn.Module, c: TransformerConfig, x):
    """[B, g, g, C] → [B, g², W]: the grid row-major, through `proj` (a 1 × 1 convolution)."""
    batch, grid, _, channels = x.shape
    x = _batch_reshape(x, (batch, grid * grid, channels))
    proj = module.param("proj", nn.initializers.lecun_normal(), (channels, c.hidden_size),
                        c.params_dtype)
    return x @ proj.astype(x.dtype)


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
            x = _conv_layer(self, c, i, x, out, stride=2)
        return _project_tokens(self, c, x)


class CnnStem(nn.Module):
    """A small CNN in place of the patch embedding: 3 × 3 convolutions (each LayerNorm over
    channels and GELU), the first two of stride 2 (S → S/4), the rest of stride 1; then the max
    over each patch's (p/4) × (p/4) cell of that map, and a 1 × 1 projection to the width.

    Why: a linear patch embedding must learn a shape once per position inside the patch, and
    learns the scenes' 10–20 px shapes barely faster than guessing (BENCHMARKS.md, "What the
    pixel towers miss"); convolutions see a shape the same wherever it is, and the max keeps a
    small object's response whole instead of averaging it with the background. Params:
    stem/{conv_{i} [3, 3, C_{i-1}, C_i], norm_{i}, proj [C_k, W]}.
    """

    config: TransformerConfig
    pixels: PixelConfig

    def channels(self) -> tuple:
        width = self.config.hidden_size
        return self.pixels.stem_channels or (max(8, width // 8), max(8, width // 4),
                                             max(8, width // 4))

    @nn.compact
    def __call__(self, images):
        """images: f[B, S, S, 3] → [B, g², W]."""
        c, grid = self.config, self.pixels.grid
        x = images.astype(c.compute_dtype)
        for i, out in enumerate(self.channels()):
            x = _conv_layer(self, c, i, x, out, stride=2 if i < 2 else 1)
        batch, side, _, channels = x.shape
        cell = side // grid
        cells = _batch_reshape(x, (batch, grid, cell, grid, cell, channels))
        x = max_over(max_over(cells, 4), 2)
        return _project_tokens(self, c, x)


class MAPHead(nn.Module):
    """big_vision's multihead attention pooling (SigLIP's MAPHead): a learned probe attends
    over the patch tokens, then x + MLP(LN(x)). tokens [B, L, W] → [B, W].
    Params: probe [W], query/key_value/out_proj (Dense), ln, mlp/{c_fc, c_proj}."""

    config: TransformerConfig

    @nn.compact
    def __call__(self, tokens):
        c = self.config
        batch, length, width = tokens.shape
        probe = self.param("probe", nn.initializers.normal(width ** -0.5), (width,),
                           c.params_dtype)
        # Built from the tokens, so it is sharded like the batch under a mesh.
        query = jnp.zeros_like(tokens[:, :1]) + probe.astype(tokens.dtype)
        heads = (c.num_heads, c.head_dim)
        query = _batch_reshape(dense(c, width, "query")(query), (batch, 1, *heads))
        key, value = jnp.split(dense(c, 2 * width, "key_value")(tokens), 2, axis=-1)
        key = _batch_reshape(key, (batch, length, *heads))
        value = _batch_reshape(value, (batch, length, *heads))
        bias = jnp.zeros((1, 1, 1, length), jnp.float32)  # every patch token is real
        pooled = attend(c, query, key, value, bias)
        pooled = dense(c, width, "out_proj")(_batch_reshape(pooled, (batch, 1, width)))
        pooled = pooled + Mlp(c, name="mlp")(layer_norm(c, "ln")(pooled))
        return pooled[:, 0]


def pool_tokens(states, pixels: PixelConfig, config: TransformerConfig):
    """The image vector's source from the ViT's states [B, 1 + g², W] → [B, W], by
    pixels.pool (PixelConfig): the class token, the patch tokens' mean, max or MAPHead (a
    submodule of the module whose compact call this is)."""
    if pixels.pool == "tok":
        return states[:, 0]
    patches = states[:, 1:]
    if pixels.pool == "avg":
        return patches.mean(axis=1)
    if pixels.pool == "max":
        return max_over(patches, 1)
    return MAPHead(config, name="map_head")(patches)


# The stems other than open_clip's linear patch embedding ("patch", conv1), by PixelConfig.stem.
STEM_MODULES = {"conv": ConvStem, "cnn": CnnStem}


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
        if pc.stem in STEM_MODULES:
            x = STEM_MODULES[pc.stem](c, pc, name="stem")(images)
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
        pooled = pool_tokens(states, self.pixels, c)
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
