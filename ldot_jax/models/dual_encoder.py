"""DualEncoder: LightningDOT's two towers, and dot-product scoring."""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax.numpy as jnp

from ldot_jax.models import towers
from ldot_jax.models.config import DualEncoderConfig
from ldot_jax.models.towers import TowerOutput


def dot_scores(text_embeddings, image_embeddings):
    """f32[Q, P] x f32[N, P] → f32[Q, N]: raw dot products (LightningDOT: no norm, no
    temperature)."""
    return jnp.einsum("qp,np->qn", text_embeddings, image_embeddings,
                      preferred_element_type=jnp.float32)


class DualEncoder(nn.Module):
    """A text tower and an image tower, no shared weights, built by name from the registries
    (`config.text_tower`, default "bert"; `config.image_tower`, default "uniter_regions").

    Inputs are one pytree per side: text {"input_ids": i32[B, L], "attention_mask": [B, L]};
    image: the image tower's input (regions: {"region_feat": f[B, R, F], "boxes": f[B, R, 7],
    "region_mask": [B, R]}).
    Params: {"text_tower": {"bert", "encode_proj"}, "image_tower": {"uniter", "encode_proj"}}
    (LightningDOT's; CLIP's: {"text_tower": {"token_embedding", …}, "image_tower": {"visual",
    "proj"}, "logit_scale": f32[]}).
    """

    config: DualEncoderConfig

    def setup(self):
        c = self.config
        self.text_tower = towers.text_tower(c.text_tower).build(c)
        self.image_tower = towers.image_tower(c.image_tower).build(c)
        if c.logit_scale is not None:  # CLIP's learned log scale of its logits
            self.logit_scale = self.param("logit_scale", nn.initializers.constant(
                c.logit_scale), (), jnp.float32)

    def __call__(self, text: Mapping[str, Any], image: Mapping[str, Any],
                 deterministic: bool = True) -> tuple[TowerOutput, TowerOutput]:
        """Both towers: (text TowerOutput, image TowerOutput)."""
        return (self.text_states(text, deterministic),
                self.image_states(image, None, deterministic))

    def text_states(self, text: Mapping[str, Any], deterministic: bool = True) -> TowerOutput:
        return self.text_tower(text, deterministic)

    def image_states(self, image: Mapping[str, Any], masked_regions=None,
                     deterministic: bool = True) -> TowerOutput:
        """masked_regions: [B, R] or None (SMRM, the region tower's pre-training input)."""
        return self.image_tower(image, masked_regions, deterministic)

    def encode_text(self, text: Mapping[str, Any], deterministic: bool = True):
        """→ f32[B, P] retrieval vectors."""
        return self.text_states(text, deterministic).embedding

    def encode_image(self, image: Mapping[str, Any], deterministic: bool = True):
        """→ f32[B, P] retrieval vectors."""
        return self.image_states(image, None, deterministic).embedding

    def logits(self, text: Mapping[str, Any], image: Mapping[str, Any]):
        """f32[B_text, B_image]: the scores scaled by exp(logit_scale) (CLIP's logits; the
        raw scores when the config has no logit_scale)."""
        scores = self.score(text, image)
        if self.config.logit_scale is None:
            return scores
        return jnp.exp(self.logit_scale) * scores

    def score(self, text: Mapping[str, Any], image: Mapping[str, Any]):
        """f32[B_text, B_image]: every caption against every image."""
        text_out, image_out = self(text, image)
        return dot_scores(text_out.embedding, image_out.embedding)
