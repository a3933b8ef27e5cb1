"""Shared fixtures. Simulated CPU devices are set before JAX is imported."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import pathlib  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

import ldot_jax  # noqa: E402
from ldot_jax.data.batching import prefix_mask  # noqa: E402,F401  (re-exported for tests)

DATA = pathlib.Path(__file__).parent / "data"
# The parity fixtures (written by the original PyTorch code, tests/data/README.md) ship in the
# package: the demo checks parity with them after a plain `pip install`.
PARITY = pathlib.Path(ldot_jax.__file__).parent / "tools" / "parity_fixtures"
# The parity fixtures' towers have hidden 32 and 4 heads (hidden / 64 does not apply).
SMALL_HEADS = 4


@pytest.fixture(scope="session")
def ldot_io():
    return dict(np.load(PARITY / "ldot_small_io.npz"))


@pytest.fixture(scope="session")
def uniter_io():
    return dict(np.load(PARITY / "uniter_small_io.npz"))


@pytest.fixture(scope="session")
def converted(tmp_path_factory):
    """The three parity checkpoints converted through the public API: kind → directory."""
    root = tmp_path_factory.mktemp("converted")
    sources = {"lightningdot": "ldot_small_weights.npz",
               "lightningdot_pretrain": "ldot_small_pretrain_weights.npz",
               "uniter_itm": "uniter_small_weights.npz"}
    return {kind: ldot_jax.convert_checkpoint(kind, PARITY / name, root / kind,
                                              num_heads=SMALL_HEADS)
            for kind, name in sources.items()}


def flat(batch: dict) -> dict:
    """{"['image']['region_feat']": array, …}: a batch's leaves by their path (batches hold
    one input pytree per side)."""
    import jax
    return {jax.tree_util.keystr(path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(batch)[0]}
