"""Shared fixtures. Simulated CPU devices are set before JAX is imported."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# The tests' programs are tiny and each is compiled once or twice: compile time, not run time,
# is what the suite spends, and LLVM's optimization passes are most of it (measured: a third
# less CPU). They change the speed of the generated code, not what it computes.
os.environ["XLA_FLAGS"] += (" --xla_backend_optimization_level=0"
                            " --xla_llvm_disable_expensive_passes=true")

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


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory):
    """Tests compile the same tiny programs many times (every training run, every device
    count): one persistent XLA cache for the whole run makes the repeats cheap. It is shared
    with the subprocesses (the environment) and, under pytest-xdist, with the other workers
    (the run's common temporary directory)."""
    import jax
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # pytest-N/popen-gwK → pytest-N: the same for every worker
    path = base / "jax_cache"
    path.mkdir(exist_ok=True)
    saved = {k: os.environ.get(k) for k in CACHE_ENV}
    os.environ.update({"JAX_COMPILATION_CACHE_DIR": str(path),
                       "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"})
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    yield path
    jax.config.update("jax_compilation_cache_dir", None)
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


CACHE_ENV = ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS")


def pytest_collection_modifyitems(items):
    """The longest test (it builds and installs the wheel, then runs the demo in its own
    process) goes first, so under pytest-xdist it runs beside the others, not after them."""
    items.sort(key=lambda item: item.nodeid.split("::")[0] != "tests/test_wheel.py")


def flat(batch: dict) -> dict:
    """{"['image']['region_feat']": array, …}: a batch's leaves by their path (batches hold
    one input pytree per side)."""
    import jax
    return {jax.tree_util.keystr(path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(batch)[0]}


@pytest.fixture(scope="session")
def gcs_emulator():
    """A local GCS emulator for the session (tests/gcs.py); tests take fresh prefixes."""
    import gcs
    with gcs.emulator() as url:
        yield url
