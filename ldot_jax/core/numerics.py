"""Array helpers shared by every layer."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def check_finite(x, what: str) -> None:
    """ValueError naming `what`, how many values and the first position, if float array `x`
    holds NaN or inf (a bad value never becomes a good-looking number downstream)."""
    x = np.asarray(x)
    if x.dtype.kind not in "fc" or np.isfinite(x).all():
        return
    bad = np.argwhere(~np.isfinite(x))
    first = tuple(int(i) for i in bad[0])
    raise ValueError(f"{what}: {len(bad)} non-finite value(s) of {x.size}, the first at "
                     f"{first if len(first) != 1 else first[0]} ({x[first]}); shape {x.shape}")


def check_fits(x, dtype, what: str) -> None:
    """ValueError naming `what` if finite values of `x` overflow float `dtype` (they would be
    stored as inf)."""
    x = np.asarray(x)
    if x.dtype.kind != "f" or not x.size:
        return
    limit = float(np.finfo(dtype).max)
    largest = float(np.max(np.abs(x[np.isfinite(x)]), initial=0.0))
    if largest > limit:
        raise ValueError(f"{what}: |value| {largest:g} does not fit {np.dtype(dtype).name} "
                         f"(max {limit:g}); it would be stored as inf")


def l2_normalize(x):
    """Rows of f[..., D] scaled to unit length (zero rows stay zero). NumPy in → NumPy out
    (the index and the evaluation); a JAX array or tracer in → JAX out (the losses)."""
    xp = jnp if isinstance(x, jax.Array) else np
    return x / xp.maximum(xp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
