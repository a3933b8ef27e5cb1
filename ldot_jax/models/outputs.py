"""What every tower returns (models/towers.py's registries build the towers)."""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp


class TowerOutput(NamedTuple):
    """sequence: [B, S, H] last-layer states; mask: [B, S]; cls_state: [B, H] = sequence[:, 0]
    (the raw [CLS] state the pre-training heads fuse); embedding: f32[B, P] retrieval vector."""

    sequence: jnp.ndarray
    mask: jnp.ndarray
    cls_state: jnp.ndarray
    embedding: jnp.ndarray
