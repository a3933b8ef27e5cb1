"""CrossEncoder: UNITER ITM, the slow-stage re-ranker."""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple

import flax.linen as nn
import jax.numpy as jnp

from ldot_jax.models.config import CrossEncoderConfig
from ldot_jax.models.layers import dense
from ldot_jax.models.inputs import pixel_fields
from ldot_jax.models.towers import UniterTrunk, region_fields, text_fields
from ldot_jax.models.vit import VisionTransformer, tokens_as_regions


class CrossEncoderOutput(NamedTuple):
    """sequence: [B, L + R, H] packed (text then regions, no gap); mask: bool[B, L + R];
    pooled: [B, H] = tanh(pooler(h0)); itm_logits: f32[B, 2]; rank_score: f32[B]."""

    sequence: jnp.ndarray
    mask: jnp.ndarray
    pooled: jnp.ndarray
    itm_logits: jnp.ndarray
    rank_score: jnp.ndarray


class CrossEncoder(nn.Module):
    """UNITER single stream over a caption and an image's regions.

    Params: {"uniter": {"embeddings", "region_embeddings", "encoder"}, "pooler", "itm_output",
    "rank_output"} (+ "vit", the patch re-ranker's ViT: models/vit.VisionTransformer's
    params). The re-ranking score is the raw `rank_output` logit.
    """

    config: CrossEncoderConfig

    def setup(self):
        c = self.config.transformer
        self.uniter = UniterTrunk(c, self.config.region)
        self.pooler = dense(c, c.hidden_size)
        self.itm_output = dense(c, 2)
        self.rank_output = dense(c, 1)
        if self.config.image_tower == "vit":
            self.vit = VisionTransformer(self.config.image, self.config.pixels)

    def patch_regions(self, image: Mapping[str, Any], deterministic: bool = True) -> dict:
        """The patch re-ranker's regions of pixels {"pixels": uint8[B, S, S, 3]}: its ViT's
        class and patch tokens as a region input (vit.tokens_as_regions), R = 1 + g²."""
        if self.config.image_tower != "vit":
            raise ValueError("patch_regions: this cross-encoder reads detector regions "
                             "(config.image_tower is None), not pixels")
        return tokens_as_regions(self.vit(pixel_fields(image), deterministic),
                                 self.config.pixels.grid)

    def __call__(self, text: Mapping[str, Any], image: Mapping[str, Any],
                 deterministic: bool = True) -> CrossEncoderOutput:
        """text: {"input_ids": i32[B, L], "attention_mask": [B, L] prefix mask}; image: the
        region input {"region_feat": f[B, R, F], "boxes": f[B, R, 7], "region_mask": [B, R]
        prefix mask} (a patch re-ranker also takes pixels, {"pixels": uint8[B, S, S, 3]},
        and reads them through `patch_regions`). Pair i is (caption i, image i)."""
        if "pixels" in image:
            image = self.patch_regions(image, deterministic)
        input_ids, text_mask = text_fields(text)
        region_feat, boxes, region_mask = region_fields(image)
        sequence, mask = self.uniter(input_ids, text_mask, region_feat, boxes, region_mask,
                                     pack=True, deterministic=deterministic)
        pooled = jnp.tanh(self.pooler(sequence[:, 0]))
        return CrossEncoderOutput(sequence, mask, pooled,
                                  self.itm_output(pooled).astype(jnp.float32),
                                  self.rank_output(pooled)[:, 0].astype(jnp.float32))

    def score(self, text: Mapping[str, Any], image: Mapping[str, Any]):
        """f32[B]: the re-ranking logit of each (caption, image) pair."""
        return self(text, image).rank_score
