"""Array helpers shared by every layer."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np



def l2_normalize(x):
    """Rows of f[..., D] scaled to unit length (zero rows stay zero). NumPy in → NumPy out
    (the index and the evaluation); a JAX array or tracer in → JAX out (the losses)."""
    xp = jnp if isinstance(x, jax.Array) else np
    return x / xp.maximum(xp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
