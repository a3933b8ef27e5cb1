"""The evaluators' contract and what they share.

An evaluator type is a module of this package with a class `Evaluator(context, **keys)`:
`context` (`EvalContext`) holds what the trainer can give (the model being trained, the mesh,
the run config, the dataset, model directories loaded once); `keys` are the type's own keys
of its config entry (e.g. split, top). It has `metrics`, the names of what it returns, and
`run(params, progress) -> {metric: float}` on the trained model's params. `Scheduled` wraps
one entry of `config.evals`: its name, when it runs and the prefix of its metrics.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax

from ldot_jax.checkpoints import pretrained
from ldot_jax.core import parallel, paths
from ldot_jax.evaluation import recall
from ldot_jax.retrieval import extract

RECALL_METRICS = tuple([f"{d}_r{k}" for d in ("ir", "tr") for k in recall.KS] + ["ar"])
CAPTION_TRUE_METRICS = tuple("ct_" + m for m in RECALL_METRICS)


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """A model directory's kind, Flax module and params (replicated over the mesh)."""

    kind: str
    module: Any
    params: Any


class LoadedModels:
    """Model directories loaded once per run, replicated over `mesh` (the frozen models of
    the tasks and of the evaluators are often the same directory)."""

    def __init__(self, mesh):
        self.mesh = mesh
        self._loaded: dict[str, LoadedModel] = {}

    def load(self, directory: str) -> LoadedModel:
        key = paths.absolute(directory)
        if key not in self._loaded:
            loaded = pretrained.load_pretrained(directory)
            self._loaded[key] = LoadedModel(
                loaded.kind, pretrained.build_model(loaded.kind, loaded.config),
                parallel.replicate(jax.device_get(loaded.params), self.mesh))
        return self._loaded[key]


@dataclasses.dataclass
class EvalContext:
    """What evaluators get from the trainer.

    model / kind: the Flax module being trained and its model kind; mesh: the run's mesh;
    config: the run config; dataset: the run's dataset (`split`, `caption_table`,
    `tokenizer`); models: model directories loaded once."""

    model: Any
    kind: str
    mesh: Any
    config: Any
    dataset: Any
    models: LoadedModels
    _splits: dict = dataclasses.field(default_factory=dict)
    _judged: dict = dataclasses.field(default_factory=dict)

    def _judge(self, method: str, name: str):
        """dataset.<method>(name), once per (method, split); None if the dataset has none."""
        if (method, name) not in self._judged:
            judge = getattr(self.dataset, method, None)
            self._judged[method, name] = judge(name) if judge else None
        return self._judged[method, name]

    def caption_truth(self, name: str):
        """bool[T, N] caption-true-of-image of split `name` (the split's captions in order),
        or None when the dataset cannot tell; computed once."""
        return self._judge("caption_truth", name)

    def caption_kinds(self, name: str):
        """str[T] what each caption of split `name` asks for, or None when the dataset cannot
        tell (the scenes can: scenes_truth.KINDS); computed once."""
        return self._judge("caption_kinds", name)

    def split(self, name: str):
        """(images, tokenized captions) of split `name`: every image and every caption once, each
        caption truncated to the largest text bucket (extract.eval_captions); loaded
        once."""
        if name not in self._splits:
            images = self.dataset.split(name)
            captions = extract.eval_captions(self.dataset.caption_table(name),
                                             self.dataset.tokenizer, name, self.config)
            self._splits[name] = (images, captions)
        return self._splits[name]


@dataclasses.dataclass(frozen=True)
class Scheduled:
    """One entry of `config.evals`: evaluator runs at every `every`-th step (None: only at
    the end) and at the run's last step; its metrics are written as prefix + name."""

    name: str
    evaluator: Any
    every: int | None
    prefix: str

    def due(self, step: int, last_step: int) -> bool:
        return bool(self.every and step % self.every == 0) or step == last_step

    @property
    def metrics(self) -> tuple[str, ...]:
        return tuple(self.prefix + m for m in self.evaluator.metrics)

    def run(self, params, progress: bool = False) -> dict[str, float]:
        return {self.prefix + k: float(v) for k, v in
                self.evaluator.run(params, progress).items()}


def entry_keys(entry: Mapping[str, Any]) -> dict[str, Any]:
    """A config entry as a plain dict (ConfigDict or dict)."""
    return dict(entry.to_dict() if hasattr(entry, "to_dict") else entry)
