"""The pre-training models: LightningDOT's (the dual encoder plus the VMLM / SMRM heads) and
UNITER's (the single-stream trunk with its ITM, MLM, MRFR and MRC heads), whose released
checkpoints (uniter-base.pt, uniter-large.pt) initialize LightningDOT's image tower.

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

from ldot_jax.models.config import CrossEncoderConfig, DualEncoderConfig
from ldot_jax.models.dual_encoder import DualEncoder
from ldot_jax.models.heads import MRCHead, TiedOutputHead
from ldot_jax.models.layers import dense
from ldot_jax.models.towers import UniterTrunk, region_fields, text_fields


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


class CrossEncoderForPretraining(nn.Module):
    """UNITER's pre-training model (`UniterForPretraining`): the trunk over a caption and an
    image's regions (packed, text first), the pooler with the 2-way ITM head, the MLM head
    (tied to the word embeddings), the MRFR head (tied to img_linear) and the MRC head.

    Params: {"uniter", "pooler", "itm_output", "mlm_head", "mrfr_head", "mrc_head"}; the
    "uniter" subtree is the re-ranker's and the image tower's trunk.
    """

    config: CrossEncoderConfig

    def setup(self):
        c = self.config.transformer
        self.uniter = UniterTrunk(c, self.config.region)
        self.pooler = dense(c, c.hidden_size)
        self.itm_output = dense(c, 2)
        self.mlm_head = TiedOutputHead(c)
        self.mrfr_head = TiedOutputHead(c)
        self.mrc_head = MRCHead(c, self.config.region.num_classes)

    def __call__(self, text, image, masked_regions, deterministic: bool = True):
        """Every head: (ITM f32[B, 2], MLM f32[B, L, V], MRFR f32[B, R, F], MRC f32[B, R, C]).
        Used to initialize every parameter."""
        return (self.itm_logits(text, image, deterministic),
                self.mlm_logits(text, image, deterministic=deterministic),
                self.mrfr_prediction(text, image, masked_regions, deterministic=deterministic),
                self.mrc_logits(text, image, masked_regions, deterministic=deterministic))

    def states(self, text, image, masked_regions=None, deterministic: bool = True,
               zero_masked: bool = True):
        """(states [B, L + R, H] packed, mask bool[B, L + R]); text: {"input_ids",
        "attention_mask"} prefix masks; image: the region input."""
        input_ids, text_mask = text_fields(text)
        region_feat, boxes, region_mask = region_fields(image)
        return self.uniter(input_ids, text_mask, region_feat, boxes, region_mask,
                           masked_regions, pack=True, deterministic=deterministic,
                           zero_masked=zero_masked)

    def pooled(self, text, image, deterministic: bool = True):
        """[B, H] = tanh(pooler(h0))."""
        sequence, _ = self.states(text, image, deterministic=deterministic)
        return jnp.tanh(self.pooler(sequence[:, 0]))

    def itm_logits(self, text, image, deterministic: bool = True):
        """f32[B, 2]: image-text matching logits (index 1: matched)."""
        return self.itm_output(self.pooled(text, image, deterministic)).astype(jnp.float32)

    def mlm_logits(self, text, image, positions=None, deterministic: bool = True):
        """text: with [MASK]s in its input_ids; positions: i32[B, M] token indices or None
        (every text position) → f32[B, M|L, V]."""
        sequence, _ = self.states(text, image, deterministic=deterministic)
        length = text_fields(text)[0].shape[1]
        table = self.uniter.embeddings.word_embeddings.embedding
        return self.mlm_head(_gather(sequence[:, :length], positions), table)

    def region_states(self, text, image, masked_regions, positions=None,
                      deterministic: bool = True, zero_masked: bool = True):
        """[B, M|R, H]: the states of regions `positions` (i32[B, M] region indices, or None:
        all), which follow each caption's real tokens in the packed sequence.
        zero_masked=False adds the mask row to the given features (the original model alone;
        its pre-training collate zeroes them first, which True does)."""
        sequence, _ = self.states(text, image, masked_regions, deterministic, zero_masked)
        _, text_mask = text_fields(text)
        regions = region_fields(image)[0].shape[1]
        index = jnp.arange(regions, dtype=jnp.int32)[None] if positions is None else positions
        index = index + jnp.sum(text_mask, axis=1, keepdims=True).astype(jnp.int32)
        return _gather(sequence, index)

    def mrfr_prediction(self, text, image, masked_regions, positions=None,
                        deterministic: bool = True, zero_masked: bool = True):
        """→ f32[B, M|R, F]: regressed region features."""
        states = self.region_states(text, image, masked_regions, positions, deterministic,
                                    zero_masked)
        return self.mrfr_head(states, self.uniter.region_embeddings.img_linear_kernel())

    def mrc_logits(self, text, image, masked_regions, positions=None,
                   deterministic: bool = True, zero_masked: bool = True):
        """→ f32[B, M|R, C]: detector-class logits."""
        states = self.region_states(text, image, masked_regions, positions, deterministic,
                                    zero_masked)
        return self.mrc_head(states)
