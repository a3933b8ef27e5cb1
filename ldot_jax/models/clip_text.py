"""The CLIP text tower (open_clip's text transformer): `<sot> BPE tokens <eot>` → a vector.

token + learned position embeddings → causal pre-LN blocks → LN_final → the state of the
end-of-text token (the last real token: the attention mask's length − 1; open_clip takes the
argmax id, which is the same token for its zero-padded, `<eot>`-terminated rows) →
`text_projection` (no bias).

Params (open_clip's names): token_embedding/embedding [V, W], positional_embedding [C, W]
(C = max_position_embeddings, CLIP's context length 77), transformer/resblocks_{n}/…,
ln_final, text_projection [W, P].

Shapes: B batch, L text length (≤ C), W width, P projection dim.
"""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax.numpy as jnp

from ldot_jax.core import numerics
from ldot_jax.models import inputs
from ldot_jax.models.config import TransformerConfig
from ldot_jax.models.inputs import text_fields
from ldot_jax.models.layers import Embed, layer_norm
from ldot_jax.models.outputs import TowerOutput
from ldot_jax.models.prenorm import PreLNEncoder


class ClipTextTower(nn.Module):
    """TowerOutput: sequence = LN_final(states) [B, L, W]; mask = the attention mask;
    cls_state = the end-of-text state [B, W]; embedding = text_projection(cls_state)
    f32[B, P], L2-normalized if `normalize`."""

    config: TransformerConfig
    project_dim: int
    normalize: bool = False

    @nn.compact
    def __call__(self, text: Mapping[str, Any], deterministic: bool = True) -> TowerOutput:
        """text: {"input_ids": i32[B, L], "attention_mask": [B, L] prefix mask}."""
        c = self.config
        input_ids, attention_mask = text_fields(text)
        inputs.check_text(input_ids, attention_mask, c)
        inputs.check_prefix_mask("attention_mask", attention_mask)
        tokens = Embed(c.vocab_size, c.hidden_size, dtype=c.compute_dtype,
                       param_dtype=c.params_dtype,
                       embedding_init=nn.initializers.normal(0.02),
                       name="token_embedding")(input_ids)
        positions = self.param("positional_embedding", nn.initializers.normal(0.01),
                               (c.max_position_embeddings, c.hidden_size), c.params_dtype)
        x = tokens + positions[:input_ids.shape[1]].astype(tokens.dtype)
        x = PreLNEncoder(c, causal=True, name="transformer")(x, attention_mask, deterministic)
        x = layer_norm(c, "ln_final")(x)
        last = jnp.maximum(attention_mask.astype(jnp.int32).sum(axis=1) - 1, 0)
        pooled = jnp.take_along_axis(x, last[:, None, None], axis=1)[:, 0]
        projection = self.param("text_projection",
                                nn.initializers.normal(c.hidden_size ** -0.5),
                                (c.hidden_size, self.project_dim), c.params_dtype)
        embedding = (pooled @ projection.astype(pooled.dtype)).astype(jnp.float32)
        if self.normalize:
            embedding = numerics.l2_normalize(embedding)
        return TowerOutput(x, attention_mask.astype(bool), pooled, embedding)
