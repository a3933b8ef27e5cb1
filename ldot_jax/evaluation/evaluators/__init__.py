"""Evaluators during training: plug-ins with one contract (common.py), as many as a config
lists, each chosen by its entry's `type`.

    config.evals.val = dict(type="dot_recall", split="val", every=2000)
    config.evals.test = dict(type="dot_recall", split="test")
    config.train.best_metric = "val/ar"

Every entry takes `type`, `every` (run at every `every`-th step; None: only at the run's
last step, when every evaluator runs) and `prefix` (what its metrics are written under;
default "<name>/"), plus its type's own keys (see each module). Without an `evals` section
the old keys describe the one evaluation of a run (`evals_config`), with the metric names
unprefixed as before.

Types (adding one is a module with an `Evaluator` class plus one entry in `TYPES`):
  dot_recall     dot-product IR / TR recall of a dual encoder (dot_recall.py);
  rerank_recall  recall of the cross-encoder re-ranking a frozen dual encoder's top
                 (rerank_recall.py).
Modules are imported when a config uses them (the re-ranker's evaluation brings the index
code), as scenic's dataset table does.
"""

from __future__ import annotations

import importlib
import inspect
import logging
from typing import Any, Mapping

from ldot_jax.checkpoints import kinds
from ldot_jax.evaluation.evaluators import common
from ldot_jax.evaluation.evaluators.common import EvalContext, LoadedModels, Scheduled

__all__ = ["TYPES", "register", "get", "evals_config", "default_prefix", "declared_metrics",
           "from_config", "metric_names", "check_metric", "run_due", "EvalContext",
           "LoadedModels", "Scheduled"]

log = logging.getLogger(__name__)

# type → the module holding its `Evaluator`, or the class itself (see `register`).
TYPES: dict[str, str | type] = {
    "dot_recall": "ldot_jax.evaluation.evaluators.dot_recall",
    "rerank_recall": "ldot_jax.evaluation.evaluators.rerank_recall",
}
ENTRY_KEYS = ("type", "every", "prefix")  # the keys of every entry; the rest are the type's


def register(name: str, evaluator: str | type) -> None:
    """Adds an evaluator type (a module path holding `Evaluator`, or the class); a name
    already taken is refused."""
    if name in TYPES:
        raise ValueError(f"evaluator type {name!r} is already registered")
    TYPES[name] = evaluator


def get(name: str) -> type:
    """The Evaluator class of type `name` (a ValueError lists the valid types)."""
    if name not in TYPES:
        raise ValueError(f"unknown evaluator type {name!r}; valid types are {sorted(TYPES)}")
    found = TYPES[name]
    return importlib.import_module(found).Evaluator if isinstance(found, str) else found


def evals_config(config) -> dict[str, dict[str, Any]]:
    """{name: entry} of a run: `config.evals`, or without that section the evaluation the
    old keys describe: none without data.eval_split; for a dual-encoder kind dot_recall on
    data.eval_split every train.eval_every steps; otherwise (the cross-encoder) rerank_recall
    of the top itm.eval_top of itm.dual when itm.dual is set. Its name is "" and its metrics
    are unprefixed (ir_r1, …, ar), as they always were."""
    if config.get("evals") is not None:
        return {name: common.entry_keys(entry) for name, entry in config.evals.items()}
    split = config.data.get("eval_split")
    if not split:
        return {}
    every = config.train.get("eval_every")
    if kinds.get(config.model_kind).is_dual_encoder:
        return {"": {"type": "dot_recall", "split": split, "every": every}}
    itm = config.get("itm") or {}
    if not itm.get("dual"):
        log.warning("the cross-encoder is not evaluated during training: itm.dual is not set")
        return {}
    return {"": {"type": "rerank_recall", "split": split, "every": every,
                 "top": int(itm.get("eval_top", 20))}}


def default_prefix(name: str) -> str:
    """What an entry's metrics are written under: "<name>/" ("" for the old keys' one)."""
    return f"{name}/" if name else ""


def declared_metrics(config) -> list[str]:
    """The metric names a run's evaluators write on any dataset, from their types'
    declarations (nothing is built: no data or model is loaded). Built evaluators may add
    what their data allows (dot_recall on the scenes: caption-true recall, ct_*);
    `metric_names` of the built ones is the full list."""
    return [entry.get("prefix", default_prefix(name)) + metric
            for name, entry in evals_config(config).items()
            for metric in get(entry["type"]).metrics]


def _build(name: str, entry: Mapping[str, Any], context: EvalContext) -> Scheduled:
    where = f"evals.{name}" if name else "the evaluation of data.eval_split"
    keys = dict(entry)
    if "type" not in keys:
        raise ValueError(f"{where}: no type; valid types are {sorted(TYPES)}")
    try:
        cls = get(keys.pop("type"))
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    every, prefix = keys.pop("every", None), keys.pop("prefix", default_prefix(name))
    accepted = [p for p in inspect.signature(cls).parameters if p != "context"]
    unknown = sorted(set(keys) - set(accepted))
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown} for type {entry['type']!r}; its "
                         f"keys are {list(ENTRY_KEYS) + accepted}")
    try:
        evaluator = cls(context, **keys)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from e
    return Scheduled(name, evaluator, int(every) if every else None, prefix)


def from_config(config, context: EvalContext) -> list[Scheduled]:
    """The evaluators of a run (`evals_config`), built on `context`; two writing the same
    metric name are refused."""
    out = [_build(name, entry, context) for name, entry in evals_config(config).items()]
    seen: dict[str, str] = {}
    for scheduled in out:
        for metric in scheduled.metrics:
            if metric in seen:
                raise ValueError(f"evals.{seen[metric]} and evals.{scheduled.name} both write "
                                 f"metric {metric!r}: give them different prefixes")
            seen[metric] = scheduled.name
    return out


def metric_names(evaluators: list[Scheduled]) -> list[str]:
    return [m for e in evaluators for m in e.metrics]


def check_metric(evaluators: list[Scheduled], metric: str | None, where: str) -> None:
    """`metric` (e.g. train.best_metric) must be one of the evaluators' metrics."""
    if metric and evaluators and metric not in metric_names(evaluators):
        raise ValueError(f"{where}={metric!r} is not an evaluator's metric; valid metrics "
                         f"are {metric_names(evaluators)}")


def run_due(evaluators: list[Scheduled], step: int, last_step: int, params,
            progress: bool = False) -> dict[str, float] | None:
    """The metrics of the evaluators due at `step` (None when none is)."""
    due = [e for e in evaluators if e.due(step, last_step)]
    if not due:
        return None
    out = {}
    for scheduled in due:
        out.update(scheduled.run(params, progress))
    return out
