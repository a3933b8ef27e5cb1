"""The LightningDOT pre-training model: the dual encoder plus the VMLM / SMRM heads.

Fusion (the paper's method, `cls_concat='add'` in the original): each text token's state gets
the image tower's raw last-layer [CLS] state added before the MLM head (VMLM); each region's
state gets the text tower's raw [CLS] state added before the MRFR / MRC heads (SMRM).

Shapes: B batch, L text length, R regions, H hidden, V vocab, F feature dim, C classes,
M gathered positions. `text` / `image` are the towers' input pytrees (models/towers.py); SMRM
(masked_regions, the MRFR / MRC heads) is defined over the region tower.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from ldot_jax.models.config import DualEncoderConfig
from ldot_jax.models.dual_encoder import DualEncoder
from ldot_jax.models.heads import MRCHead, TiedOutputHead


def _gather(states, positions):
    """states: [B, S, H]; positions: i32[B, M] or None → [B, M, H] (or states)."""
    if positions is None:
        return states
    return jnp.take_along_axis(states, positions[..., None], axis=1)


class DualEncoderForPretraining(nn.Module):
    """Params: {"dual_encoder": DualEncoder params, "mlm_head", "mrfr_head", "mrc_head"}."""

    config: DualEncoderConfig

    def setup(self):
        c = self.config
        if c.text.hidden_size != c.image.hidden_size:
            raise ValueError(f"pre-training fuses the towers' states: text hidden_size="
                             f"{c.text.hidden_size} must equal image hidden_size="
                             f"{c.image.hidden_size}")
        self.dual_encoder = DualEncoder(c)
        self.mlm_head = TiedOutputHead(c.image)
        self.mrfr_head = TiedOutputHead(c.image)
        self.mrc_head = MRCHead(c.image, c.region.num_classes)

    def __call__(self, text, image, masked_regions, deterministic: bool = True):
        """All heads at every position: (VMLM f32[B, L, V], MRFR f32[B, R, F],
        MRC f32[B, R, C]). Used to initialize every parameter."""
        return (self.vmlm_logits(text, image, deterministic=deterministic),
                self.mrfr_prediction(text, image, masked_regions, deterministic=deterministic),
                self.mrc_logits(text, image, masked_regions, deterministic=deterministic))

    def vmlm_logits(self, text, image, positions=None, deterministic: bool = True):
        """text: the text input with [MASK]s in its input_ids; image: the image input;
        positions: i32[B, M] or None → f32[B, M|L, V]."""
        text_out = self.dual_encoder.text_states(text, deterministic)
        image_out = self.dual_encoder.image_states(image, None, deterministic)
        fused = _gather(text_out.sequence, positions) + image_out.cls_state[:, None]
        table = self.dual_encoder.image_tower.uniter.embeddings.word_embeddings.embedding
        return self.mlm_head(fused, table)

    def smrm_states(self, text, image, masked_regions, positions=None,
                    deterministic: bool = True):
        """Fused region states [B, M|R, H]: region states (masked ones replaced by the mask
        embedding at the input) + the text tower's [CLS] state. `positions` index regions
        (0-based, excluding the image [CLS])."""
        text_out = self.dual_encoder.text_states(text, deterministic)
        image_out = self.dual_encoder.image_states(image, masked_regions, deterministic)
        return _gather(image_out.sequence[:, 1:], positions) + text_out.cls_state[:, None]

    def mrfr_prediction(self, text, image, masked_regions, positions=None,
                        deterministic: bool = True):
        """→ f32[B, M|R, F]: regressed region features."""
        fused = self.smrm_states(text, image, masked_regions, positions, deterministic)
        region_embeddings = self.dual_encoder.image_tower.uniter.region_embeddings
        return self.mrfr_head(fused, region_embeddings.img_linear_kernel())

    def mrc_logits(self, text, image, masked_regions, positions=None,
                   deterministic: bool = True):
        """→ f32[B, M|R, C]: detector-class logits."""
        fused = self.smrm_states(text, image, masked_regions, positions, deterministic)
        return self.mrc_head(fused)
