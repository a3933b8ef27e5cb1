"""The training tasks, one module each, registered by name (`config.tasks` names them).

  cmr     the in-batch contrastive loss (LightningDOT's CMR / fine-tuning loss and options);
  vmlm    masked-token prediction from text states + the image tower's raw [CLS] state;
  mrfr    masked-region feature regression from region states + the text tower's [CLS] state;
  mrckl   masked-region class distribution (KL to the detector's soft labels);
  itm     the cross-encoder (re-ranker) on hard negatives drawn by a frozen dual encoder;
  distill the dual encoder's CMR loss plus KL distillation from a frozen cross-encoder.

Each module declares a `common.Task`: its loss function, the config sections it reads (and
the dataclass parsed from each), the frozen models it needs and the pipeline masks it needs.
The trainer asks this registry for all of them and never names a task. Adding a task is a new
module here plus one entry in the registration loop below.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from ldot_jax.training.tasks import cmr, distill, itm, mrckl, mrfr, vmlm
from ldot_jax.training.tasks.common import FrozenModel, LossConfig, Task, TaskSetup, embed_pair
from ldot_jax.training.tasks.distill import DistillConfig
from ldot_jax.training.tasks.itm import ItmConfig
from ldot_jax.training.tasks.vmlm import vmlm_positions

__all__ = ["TASKS", "register", "get", "check_mix", "task_of_step", "task_configs",
           "make_setup", "frozen_models", "pipeline_flags", "init_params", "Task", "TaskSetup",
           "FrozenModel", "LossConfig", "ItmConfig", "DistillConfig", "embed_pair",
           "vmlm_positions"]

TASKS: dict[str, Task] = {}


def register(task: Task) -> Task:
    """Adds `task` to the registry; a name already taken, a config section already parsed
    into another dataclass or a frozen model's name already read from another key is
    refused."""
    if task.name in TASKS:
        raise ValueError(f"task {task.name!r} is already registered")
    for other in TASKS.values():
        keys = {spec.name: spec.key for spec in other.frozen}
        for spec in task.frozen:
            if keys.get(spec.name, spec.key) != spec.key:
                raise ValueError(f"task {task.name!r} reads frozen model {spec.name!r} from "
                                 f"{spec.key}; task {other.name!r} from {keys[spec.name]}")
        for section, cls in task.sections.items():
            if other.sections.get(section, cls) is not cls:
                raise ValueError(f"task {task.name!r} parses config section {section!r} into "
                                 f"{cls.__name__}; task {other.name!r} into "
                                 f"{other.sections[section].__name__}")
    TASKS[task.name] = task
    return task


def get(name: str) -> Task:
    """The task called `name` (a ValueError lists the valid names)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; valid tasks are {sorted(TASKS)}")
    return TASKS[name]


# The built-in tasks: adding one is a module of this package plus an entry here.
for _module in (cmr, vmlm, mrfr, mrckl, itm, distill):
    register(_module.TASK)


def check_mix(mix: Mapping[str, float]) -> tuple[tuple[str, ...], np.ndarray]:
    """{task: ratio} → (names, probabilities). The original's defaults are ratios like
    {cmr: 16, vmlm: 8, mrfr: 4, mrckl: 4} (COCO / SBU) or {16, 12, 6, 6} (VG / CC)."""
    if not mix:
        raise ValueError("tasks: no task to train (give at least one {task: ratio})")
    names = tuple(sorted(mix))
    for name in names:
        get(name)
        if not mix[name] > 0:
            raise ValueError(f"tasks.{name}={mix[name]}: a mix ratio must be > 0")
    ratios = np.asarray([float(mix[n]) for n in names])
    return names, ratios / ratios.sum()


def task_of_step(step: int, names: tuple[str, ...], probabilities: np.ndarray,
                 seed: int) -> str:
    """The task of an update, drawn by mix ratio from (seed, step): the same after a resume
    and on every process."""
    if len(names) == 1:
        return names[0]
    return names[int(np.random.default_rng([seed, step]).choice(len(names), p=probabilities))]


def task_configs(config, names) -> dict[str, Any]:
    """{section: its parsed dataclass} of the config sections that the tasks `names` read."""
    out = {}
    for name in names:
        for section, cls in get(name).sections.items():
            if section not in out:
                out[section] = cls.from_config(config.get(section))
    return out


def make_setup(model, mesh, config, names, frozen: Mapping[str, Any] | None = None
               ) -> TaskSetup:
    """The TaskSetup of the tasks `names` of a run `config` (frozen: their frozen modules)."""
    return TaskSetup(model, mesh, task_configs(config, names), dict(frozen or {}))


def frozen_models(names) -> list[tuple[str, FrozenModel]]:
    """(task, frozen model) of each frozen model the tasks `names` need."""
    return [(name, spec) for name in names for spec in get(name).frozen]


def pipeline_flags(names) -> dict[str, bool]:
    """{PipelineConfig flag: whether one of the tasks `names` needs it} over every flag a
    registered task declares (e.g. {"mask_text": True, "mask_regions": False})."""
    flags = {flag for task in TASKS.values() for flag in task.pipeline}
    wanted = {flag for name in names for flag in get(name).pipeline}
    return {flag: flag in wanted for flag in sorted(flags)}


def init_params(config, names, model_config=None) -> dict:
    """The trainable parameters of the tasks `names` themselves (their config sections'
    `init_params(model_config)`, e.g. {"contrastive": {"log_scale"}} with a learned
    temperature; model_config: the trained model's, which sizes a head such as "words")."""
    return TaskSetup(None, None, task_configs(config, names)).init_params(model_config)
