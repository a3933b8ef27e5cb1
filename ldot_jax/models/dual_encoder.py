"""DualEncoder: LightningDOT's two towers, and dot-product scoring."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from ldot_jax.models.config import DualEncoderConfig
from ldot_jax.models.towers import ImageTower, TextTower, TowerOutput


def dot_scores(text_embeddings, image_embeddings):
    """f32[Q, P] x f32[N, P] → f32[Q, N]: raw dot products (LightningDOT: no norm, no
    temperature)."""
    return jnp.einsum("qp,np->qn", text_embeddings, image_embeddings,
                      preferred_element_type=jnp.float32)


class DualEncoder(nn.Module):
    """Text tower (BERT) and image tower (UNITER regions), no shared weights.

    Params: {"text_tower": {"bert", "encode_proj"}, "image_tower": {"uniter", "encode_proj"}}.
    """

    config: DualEncoderConfig

    def setup(self):
        c = self.config
        self.text_tower = TextTower(c.text, c.project_dim)
        self.image_tower = ImageTower(c.image, c.region, c.project_dim, c.cls_token_id)

    def __call__(self, input_ids, attention_mask, region_feat, boxes, region_mask,
                 deterministic: bool = True) -> tuple[TowerOutput, TowerOutput]:
        """Both towers: (text TowerOutput, image TowerOutput). See `text_states` and
        `image_states` for shapes."""
        return (self.text_states(input_ids, attention_mask, deterministic),
                self.image_states(region_feat, boxes, region_mask, None, deterministic))

    def text_states(self, input_ids, attention_mask, deterministic: bool = True) -> TowerOutput:
        """input_ids: i32[B, L] (`[CLS] … [SEP]`, 0-padded); attention_mask: [B, L]."""
        return self.text_tower(input_ids, attention_mask, deterministic)

    def image_states(self, region_feat, boxes, region_mask, masked_regions=None,
                     deterministic: bool = True) -> TowerOutput:
        """region_feat: f[B, R, F]; boxes: f[B, R, 7] `[x1,y1,x2,y2,w,h,w*h]`; region_mask:
        [B, R]; masked_regions: [B, R] or None (SMRM)."""
        return self.image_tower(region_feat, boxes, region_mask, masked_regions, deterministic)

    def encode_text(self, input_ids, attention_mask, deterministic: bool = True):
        """i32[B, L], [B, L] → f32[B, P] retrieval vectors."""
        return self.text_states(input_ids, attention_mask, deterministic).embedding

    def encode_image(self, region_feat, boxes, region_mask, deterministic: bool = True):
        """f[B, R, F], f[B, R, 7], [B, R] → f32[B, P] retrieval vectors."""
        return self.image_states(region_feat, boxes, region_mask, None, deterministic).embedding

    def score(self, input_ids, attention_mask, region_feat, boxes, region_mask):
        """f32[B_text, B_image]: every caption against every image."""
        text, image = self(input_ids, attention_mask, region_feat, boxes, region_mask)
        return dot_scores(text.embedding, image.embedding)
