"""Every config file under ldot_jax/configs/ loads and builds valid model configs."""

import importlib.util
import pathlib

import pytest

from ldot_jax.checkpoints import kinds, pretrained
from ldot_jax.evaluation import evaluators
from ldot_jax.models import config as config_lib

CONFIGS = pathlib.Path(__file__).resolve().parent.parent / "ldot_jax" / "configs"


def load_module(path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_model_presets_build_the_published_sizes():
    models = load_module(CONFIGS / "models.py")
    for name in models.PRESETS:
        cfg = models.get_config(name)
        built = kinds.model_config(cfg.kind, cfg.model)
        pretrained.abstract_params(cfg.kind, built)  # the module builds with these sizes
    base = models.get_config("lightningdot_base")
    assert kinds.model_config(base.kind, base.model) == config_lib.base_dual_encoder_config()
    uniter = models.get_config("uniter_base")
    assert (kinds.model_config(uniter.kind, uniter.model)
            == config_lib.base_cross_encoder_config())
    with pytest.raises(ValueError, match="unknown model preset 'huge'"):
        models.get_config("huge")


def test_overrides_are_validated():
    models = load_module(CONFIGS / "models.py")
    cfg = models.get_config("small")
    cfg.model.text.dtype = "bfloat16"
    assert kinds.model_config(cfg.kind, cfg.model).text.dtype == "bfloat16"
    cfg.model.text.num_heads = 5
    with pytest.raises(ValueError, match="hidden_size=32 is not divisible by num_heads=5"):
        kinds.model_config(cfg.kind, cfg.model)


def test_every_config_file_loads():
    for path in sorted(p for p in CONFIGS.glob("*.py") if p.name != "__init__.py"):
        module = load_module(path)
        assert hasattr(module, "get_config"), f"{path} has no get_config"
        assert module.get_config() is not None


def test_every_config_file_selects_by_an_evaluators_metric():
    """train.best_metric names a metric of the config's evaluators (its `evals`, or the one
    evaluation its old keys describe), so best-checkpoint retention has something to keep."""
    for path in sorted(p for p in CONFIGS.glob("*.py") if p.name not in ("__init__.py",
                                                                         "models.py")):
        cfg = load_module(path).get_config()
        metrics = evaluators.declared_metrics(cfg)
        assert metrics, f"{path.name}: no evaluation"
        assert cfg.train.best_metric in metrics, (path.name, cfg.train.best_metric, metrics)


def test_the_pixel_demo_full_scorer_has_no_residual_even_tiny():
    """demo_pixels.py:rerank_full trains the patch re-ranker's rank logit alone (no residual
    to the dot score), also in its tiny form; the residual re-ranker keeps its scale."""
    pixels = load_module(CONFIGS / "demo_pixels.py")
    assert pixels.get_config("rerank_full").itm.residual_scale is None
    assert pixels.get_config("rerank_full,tiny").itm.residual_scale is None
    assert pixels.get_config("rerank").itm.residual_scale == 20.0
    assert pixels.get_config("rerank,tiny").itm.residual_scale == 1.0
    vldeformer = pixels.get_config("vldeformer")
    assert vldeformer.model_kind == "lightningdot" and set(vldeformer.tasks) == {"distill"}
