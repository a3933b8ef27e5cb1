"""Training: `train_and_evaluate(config, workdir)` for pre-training and fine-tuning.

`setup_run` builds a run (a `TrainContext`); `train_loop` runs its steps: train, log,
evaluate, save, stop when preempted. One `jax.jit` program per (task, batch shape) over a
(data, model) mesh: params and optimizer state replicated, batches B@data, the contrastive
loss in a `shard_map` island (tasks/, contrastive.py). Each update runs ONE task drawn by mix
ratio from (seed, step) (`config.tasks`, e.g. {cmr: 16, vmlm: 8, mrfr: 4, mrckl: 4}); the
tasks' registry (tasks/__init__.py) says which config sections, frozen models and pipeline
masks they need, so this module names none. The evaluators are the ones `config.evals` lists
(ldot_jax/evaluation/evaluators; without that section, the one the old keys describe).

Reproducibility: the dropout key is `fold_in(key(seed), step)`; with JAX's partitionable
threefry each device draws different bits for its own rows of that global key, so dropout is
independent per device and identical for any device or process count. The pipeline position,
the step and the optimizer state are checkpointed, so a resumed run continues exactly.

Safety: an update with a non-finite loss or gradient is not applied; the run stops with an
error naming the step and task, after in-flight checkpoint saves finish and without saving
(so the latest checkpoint is the last good state). SIGTERM (preemption) saves a checkpoint at
the next step and returns cleanly (multi-host: at JAX's preemption sync point).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import signal
import threading
import time
from typing import Any, Callable, Mapping

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm
from jax.experimental import multihost_utils

from ldot_jax.checkpoints import checkpoint, initialize, kinds, pretrained
from ldot_jax.core import fileutil, parallel, paths
from ldot_jax.core import workdir as workdir_lib
from ldot_jax.data import datasets, pipeline
from ldot_jax.evaluation import evaluators
from ldot_jax.models import config as model_config_lib
from ldot_jax.models import towers
from ldot_jax.training import export as export_lib
from ldot_jax.training import optim, tasks
from ldot_jax.training.metric_writer import MetricWriter

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """A training step produced a NaN / Inf loss or gradient."""


@flax.struct.dataclass
class TrainState:
    """step i32[] (data batches consumed), params {"model", ["contrastive"]}, opt_state;
    every leaf replicated over the mesh."""

    step: jax.Array
    params: Any
    opt_state: Any


# ---------------------------------------------------------------------------------------------
# Pieces built from the config


def pipeline_config(config) -> pipeline.PipelineConfig:
    """The input pipeline's settings; its masks are the ones the run's tasks declare."""
    c = config.pipeline
    return pipeline.PipelineConfig(
        batch_size=c.batch_size, text_buckets=tuple(c.text_buckets),
        region_buckets=tuple(c.region_buckets), max_text_len=c.max_text_len,
        length_policy=c.length_policy, seed=config.seed, num_threads=c.num_threads,
        prefetch=c.prefetch, mined_negatives=c.get("mined_negatives"),
        mined_per_anchor=c.get("mined_per_anchor", 1),
        image_input=towers.image_input_name(config.model),
        **tasks.pipeline_flags(tuple(config.tasks)))


def frozen_models(config, names: tuple[str, ...],
                  models: evaluators.LoadedModels) -> tuple[dict, dict]:
    """The frozen models the tasks `names` declare: ({name: Flax module}, {name: params
    replicated over the mesh}), from the model directories their config keys name."""
    modules, params = {}, {}
    for task, spec in tasks.frozen_models(names):
        section, field = spec.key.split(".")
        directory = (config.get(section) or {}).get(field)
        if not directory:
            if spec.required:
                raise ValueError(f"task {task!r} needs {spec.key}: a model directory of "
                                 f"{spec.expected}")
            log.warning("%s is not set: %s", spec.key, spec.missing)
            continue
        loaded = models.load(directory)
        if not spec.accepts(loaded.kind):
            raise ValueError(f"{spec.key}={directory} holds a {loaded.kind!r} model; expected "
                             f"{spec.expected}")
        modules[spec.name], params[spec.name] = loaded.module, loaded.params
    return modules, params


def model_and_config(config):
    """(kind, model config dataclass, Flax module)."""
    kind = config.model_kind
    model_config = kinds.model_config(kind, config.model)
    return kind, model_config, pretrained.build_model(kind, model_config)


@dataclasses.dataclass
class TrainData:
    """The training iterator (this process's rows), its tokenized captions, the tokenizer and
    the dataset (the evaluators open their splits from it)."""

    iterator: Any
    captions: pipeline.TokenizedCaptions
    tokenizer: Any
    dataset: Any = None


def load_data(config) -> TrainData:
    """The training iterator and the dataset. Process 0 prepares the dataset on first use
    while the others wait."""
    c = config.data
    dataset = datasets.load_for_run(c)
    pcfg = pipeline_config(config)
    captions = pipeline.tokenize_captions(dataset.caption_table(c.train_split),
                                          dataset.tokenizer, pcfg.max_text_len,
                                          pcfg.length_policy, c.train_split, pcfg.image_input)
    iterator = iter(pipeline.training_dataset(dataset.split(c.train_split), captions,
                                              dataset.tokenizer, pcfg, jax.process_index(),
                                              jax.process_count()))
    return TrainData(iterator, captions, dataset.tokenizer, dataset)


def total_steps(config, captions: pipeline.TokenizedCaptions) -> int:
    """Data batches of the run: train.num_steps, or train.num_epochs × steps per epoch."""
    t = config.train
    if t.get("num_steps"):
        return int(t.num_steps)
    if not t.get("num_epochs"):
        raise ValueError("train: set num_steps or num_epochs")
    per_epoch = pipeline.steps_per_epoch(captions, pipeline_config(config),
                                         jax.process_count())
    return max(1, int(round(t.num_epochs * per_epoch)))


def init_state(config, kind: str, model_config, tx, mesh,
               load_pretrained: bool = True) -> TrainState:
    """A fresh replicated TrainState (params from the seed, then `config.init` sources)."""
    params = jax.device_get(pretrained.init_params(kind, model_config,
                                                   jax.random.key(config.seed)))
    if load_pretrained:
        sources = {k: config.init.get(k) for k in initialize.TARGETS}
        params = initialize.from_pretrained(params, kind, sources)
    params = {"model": params,
              **jax.device_get(tasks.init_params(config, tuple(config.tasks), model_config))}
    params = parallel.replicate(params, mesh)
    with jax.set_mesh(mesh):
        opt_state = jax.jit(tx.init)(params)
        step = jax.device_put(jnp.zeros((), jnp.int32), parallel.replicated(mesh))
    return TrainState(step, params, opt_state)


def make_train_step(task: str, setup: tasks.TaskSetup, tx: optax.GradientTransformation):
    """Jitted (state, batch, key, frozen) → (state, metrics) for one task; state is donated.
    `frozen`: {name: params} of the task's frozen models (`frozen_models`; {} for most),
    replicated, seen by the task beside state.params and never differentiated."""
    task_loss = tasks.get(task).loss

    def train_step(state: TrainState, batch: Mapping[str, jax.Array], key, frozen):
        dropout_key = jax.random.fold_in(key, state.step)
        (loss, aux), grads = jax.value_and_grad(
            lambda p: task_loss({**p, **frozen}, batch, dropout_key, setup),
            has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        # A non-finite step changes nothing, so the state in memory stays the last good one.
        keep = lambda new, old: jnp.where(finite, new, old)
        new_state = TrainState(state.step + finite.astype(jnp.int32),
                               jax.tree.map(keep, params, state.params),
                               jax.tree.map(keep, opt_state, state.opt_state))
        return new_state, {"loss": loss, "grad_norm": grad_norm, "finite": finite, **aux}

    return jax.jit(train_step, donate_argnums=0)


def _abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                        tree)


# ---------------------------------------------------------------------------------------------
# Preemption


class Preemption:
    """SIGTERM → save at the next step and stop. One process: a signal handler. Several:
    JAX's preemption sync point (its runtime catches the signal and agrees on a step)."""

    def __init__(self):
        self.requested = False
        self._previous = None
        self._multi = jax.process_count() > 1
        if not self._multi and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        log.warning("SIGTERM: saving a checkpoint at the next step, then stopping")
        self.requested = True

    def reached(self, step: int) -> bool:
        if self._multi:
            try:
                return multihost_utils.reached_preemption_sync_point(step)
            except RuntimeError:  # the preemption service is not running
                return False
        return self.requested

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


# ---------------------------------------------------------------------------------------------
# Setting a run up


@dataclasses.dataclass
class TrainContext:
    """A run set up by `setup_run` (maxtext's TrainContext): everything the loop reads.

    task_names / probabilities: the mix; step_fns: task → its jitted step; frozen: the frozen
    models' params (replicated); key: the run's PRNG key (replicated); state: the current
    TrainState (replaced by every step: the step donates it); start / stop_at: the steps of
    this run; steps: of the whole schedule (the last step evaluates and exports)."""

    config: ml_collections.ConfigDict
    workdir: str
    mesh: jax.sharding.Mesh
    kind: str
    model_config: Any
    data: TrainData
    task_names: tuple[str, ...]
    probabilities: np.ndarray
    step_fns: dict[str, Callable]
    frozen: dict
    key: jax.Array
    state: TrainState
    schedule: optax.Schedule
    start: int
    stop_at: int
    steps: int
    checkpointer: checkpoint.TrainCheckpointer
    evaluators: list[evaluators.Scheduled]
    writer: MetricWriter
    preemption: Preemption
    progress: tqdm.tqdm

    def close(self) -> None:
        self.progress.close()
        self.preemption.close()
        self.writer.close()
        self.checkpointer.close()


def _accumulation(config) -> int:
    return int(config.optimizer.get("accumulation_steps", 1) or 1)


def _initial_state(config, kind: str, model_cfg, mesh, setup: tasks.TaskSetup, steps: int,
                   ckpt: checkpoint.TrainCheckpointer, data: TrainData):
    """(state, optimizer, schedule): the state restored from the latest checkpoint (and the
    pipeline moved to its position), else a fresh one."""
    resuming = ckpt.latest_step() is not None
    abstract_params = {"model": pretrained.abstract_params(kind, model_cfg),
                       **jax.eval_shape(setup.init_params)}
    tx, schedule = optim.make_optimizer(config.optimizer,
                                        max(1, steps // _accumulation(config)), abstract_params)
    state = init_state(config, kind, model_cfg, tx, mesh, load_pretrained=not resuming)
    if resuming:
        state, data_state = ckpt.restore(_abstract(state))
        data.iterator.set_state(data_state)
        log.info("resumed from %s at step %d", ckpt.directory, int(state.step))
    return state, tx, schedule


def _ocdbt(checkpoint_format: str) -> bool:
    if checkpoint_format not in ("ocdbt", "zarr"):
        raise ValueError(f"train.checkpoint_format={checkpoint_format!r}: expected 'ocdbt' or "
                         f"'zarr'")
    return checkpoint_format == "ocdbt"


def setup_run(config: ml_collections.ConfigDict, workdir: str) -> TrainContext:
    """Everything before the first step: the mesh, the model and its tasks, their frozen
    models, the data, the evaluators, the state (fresh or restored), the step functions and
    the writers. Saves <workdir>/config.json."""
    workdir = paths.absolute(workdir)
    t = config.train
    mesh = parallel.make_mesh(config.mesh.data, config.mesh.model)
    parallel.check_global_batch(config.pipeline.batch_size, mesh)
    if jax.process_index() == 0:
        workdir_lib.record_config(config, workdir)
    kind, model_cfg, model = model_and_config(config)
    names, probabilities = tasks.check_mix(dict(config.tasks))
    kinds.check_tasks(kind, names)
    models = evaluators.LoadedModels(mesh)
    frozen_modules, frozen = frozen_models(config, names, models)
    data = load_data(config)
    model_config_lib.check_vocabulary(data.tokenizer, model_cfg)
    if jax.process_index() == 0:  # what exports of any checkpoint will carry
        export_lib.save_run_tokenizer(workdir, data.tokenizer)
    evaluation = evaluators.from_config(config, evaluators.EvalContext(
        model, kind, mesh, config, data.dataset, models))
    evaluators.check_metric(evaluation, t.get("best_metric"), "train.best_metric")
    steps = total_steps(config, data.captions)
    setup = tasks.make_setup(model, mesh, config, names, frozen_modules)
    ckpt = checkpoint.TrainCheckpointer(
        workdir_lib.checkpoints_dir(workdir), keep=t.keep_checkpoints,
        best_metric=t.get("best_metric"), best_mode=t.get("best_mode", "max"),
        async_save=t.get("async_checkpoints", True), writer=True,
        use_ocdbt=_ocdbt(t.get("checkpoint_format", "ocdbt")))
    state, tx, schedule = _initial_state(config, kind, model_cfg, mesh, setup, steps, ckpt,
                                         data)
    start = int(parallel.to_host(state.step))
    stop_at = min(steps, t.get("stop_at") or steps)
    key = parallel.replicate(jax.random.key_data(jax.random.key(config.seed)), mesh)
    progress = tqdm.tqdm(total=stop_at, initial=start, desc="train", unit="step",
                         disable=jax.process_index() != 0 or not t.get("progress_bar", True),
                         mininterval=2.0)
    return TrainContext(
        config=config, workdir=workdir, mesh=mesh, kind=kind, model_config=model_cfg, data=data,
        task_names=names, probabilities=probabilities,
        step_fns={name: make_train_step(name, setup, tx) for name in names}, frozen=frozen,
        key=jax.random.wrap_key_data(key), state=state, schedule=schedule, start=start,
        stop_at=stop_at, steps=steps, checkpointer=ckpt, evaluators=evaluation,
        writer=MetricWriter(workdir, enabled=jax.process_index() == 0,
                            tensorboard=t.get("tensorboard", True), resume_step=start),
        preemption=Preemption(), progress=progress)


# ---------------------------------------------------------------------------------------------
# The loop


class TrainMetrics:
    """The train metrics of the steps since the last logged row, read one step late (the host
    dispatches step n + 1 before it waits for step n's numbers). A non-finite step stops the
    run with NonFiniteLossError, after in-flight checkpoint saves finish."""

    def __init__(self, ckpt: checkpoint.TrainCheckpointer):
        self._ckpt = ckpt
        self._pending = None  # (step, task, the step's metrics on device)
        self._window: dict[str, list[float]] = {}
        self._start, self._steps = time.perf_counter(), 0

    def add(self, step: int, task: str, metrics) -> None:
        self.settle()
        self._pending = (step, task, metrics)
        self._steps += 1

    def settle(self) -> None:
        """Reads the pending step's metrics into the window (stops on a non-finite loss)."""
        if self._pending is None:
            return
        (step, task, metrics), self._pending = self._pending, None
        metrics = jax.device_get(metrics)
        if not bool(metrics["finite"]):
            self._ckpt.wait()
            raise NonFiniteLossError(
                f"step {step} (task {task}): non-finite loss {float(metrics['loss'])} or "
                f"gradient norm {float(metrics['grad_norm'])}; the update was not applied and "
                f"training stopped. Last good checkpoint: step {self._ckpt.latest_step()} in "
                f"{self._ckpt.directory}")
        for k, v in metrics.items():
            if k not in ("finite", "loss"):  # the task's own "<task>_loss" is in the metrics
                self._window.setdefault(k, []).append(float(v))

    def row(self, learning_rate: float, batch_size: int) -> dict[str, float]:
        """The window's means, the learning rate and the rates; starts a new window."""
        self.settle()
        elapsed = time.perf_counter() - self._start
        row = {k: float(np.mean(v)) for k, v in self._window.items()}
        row["learning_rate"] = learning_rate
        row["steps_per_sec"] = self._steps / elapsed
        row["examples_per_sec"] = row["steps_per_sec"] * batch_size
        self._window, self._start, self._steps = {}, time.perf_counter(), 0
        return row


def train_step(run: TrainContext, step: int) -> tuple[str, dict]:
    """Runs the update of data batch `step`: (its task, its metrics on device)."""
    task = tasks.task_of_step(step, run.task_names, run.probabilities, run.config.seed)
    batch = parallel.global_batch(next(run.data.iterator), run.mesh)
    run.state, metrics = run.step_fns[task](run.state, batch, run.key, run.frozen)
    return task, metrics


def log_train(run: TrainContext, done: int, window: TrainMetrics) -> dict[str, float]:
    row = window.row(float(run.schedule(done // _accumulation(run.config))),
                     run.config.pipeline.batch_size)
    run.writer.write(done, row, "train")
    run.progress.set_postfix({k: f"{v:.3f}" for k, v in row.items() if k.endswith("_loss")})
    return row


def evaluate(run: TrainContext, done: int) -> dict[str, float] | None:
    """The metrics of the evaluators due after `done` steps, written (None: none was due)."""
    metrics = evaluators.run_due(run.evaluators, done, run.steps, run.state.params["model"],
                                 not run.progress.disable)
    if metrics is not None:
        run.writer.write(done, metrics, "eval")
    return metrics


def is_checkpoint_step(run: TrainContext, done: int) -> bool:
    every = run.config.train.get("checkpoint_every")
    return done == run.stop_at or bool(every and done % every == 0)


def save(run: TrainContext, done: int, evaluated: dict[str, float] | None) -> None:
    """A checkpoint of the state after `done` steps and the pipeline position; the step's
    evaluation goes with it when it holds train.best_metric (best-checkpoint retention)."""
    best = run.config.train.get("best_metric")
    metrics = evaluated if best and evaluated and best in evaluated else None
    run.checkpointer.save(done, run.state, run.data.iterator.get_state(), metrics=metrics)
    run.writer.flush()  # the events up to a checkpoint are published with it (object stores)
    fileutil.pause_point("checkpoint_started")  # crash tests: a save in flight


def train_loop(run: TrainContext) -> dict:
    """The steps from run.start to run.stop_at: train, log, evaluate, save, stop when
    preempted. Returns the summary (see `train_and_evaluate`)."""
    summary = {"step": run.start, "preempted": False, "train": {}, "eval": {}}
    window = TrainMetrics(run.checkpointer)
    with jax.set_mesh(run.mesh):
        for step in range(run.start, run.stop_at):
            window.add(step, *train_step(run, step))
            done = step + 1
            run.progress.update(1)
            if done % run.config.train.log_every == 0 or done == run.stop_at:
                summary["train"] = log_train(run, done, window)
            evaluated = evaluate(run, done)
            if evaluated is not None:
                summary["eval"] = {**summary["eval"], **evaluated}
            preempted = run.preemption.reached(done)
            if preempted or evaluated is not None or is_checkpoint_step(run, done):
                window.settle()  # never save after a non-finite step
                save(run, done, evaluated)
            summary["step"] = done
            if preempted:
                log.warning("preempted: checkpoint of step %d saved, stopping", done)
                summary["preempted"] = True
                break
        window.settle()
    return summary


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains (resuming from <workdir>/checkpoints if present) and evaluates.

    Returns {"step", "preempted", "train": last logged train metrics, "eval": the latest
    metrics of each evaluator}. Writes <workdir>/config.json, metrics.jsonl, tensorboard/,
    checkpoints/, tokenizer/ and, at the end, model/ (the best checkpoint by
    train.best_metric when one was scored, else the final state; a model directory for
    `load_dual_encoder`).
    """
    # One run per workdir: a second `train` on it is refused while this one lives.
    lock = (fileutil.exclusive(workdir, "run directory") if jax.process_index() == 0
            else contextlib.nullcontext())
    with lock:
        return _train_and_evaluate(config, workdir)


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    run = setup_run(config, workdir)
    try:
        summary = train_loop(run)
        run.checkpointer.wait()
        if summary["step"] == run.steps and config.train.get("export", True):
            export_at_end(run, summary["step"])
    finally:
        run.close()
    return summary


def export_at_end(run: TrainContext, step: int) -> str | None:
    """Writes <workdir>/model: the best checkpoint by train.best_metric when one was scored,
    else the final state. Every process calls it; process 0 writes (reading a best checkpoint's
    parameters from disk on its own), and a failure there is raised on every process."""
    best = run.checkpointer.best_step()
    path, error = None, None
    if jax.process_index() == 0:
        try:
            if best is not None and best != step:  # its parameters only, from disk, to host
                host, step = export_lib.checkpoint_params(run.workdir, best), best
            else:  # the final state's params are replicated: this process holds them
                host = parallel.to_host(run.state.params["model"])
            path = export_lib.write(run.workdir, run.kind, run.model_config, host, step,
                                    run.data.tokenizer, exported_by="train",
                                    score=export_lib.score_of(run.checkpointer, step),
                                    normalize=bool(run.config.loss.get("normalize", False)))
        except Exception as e:  # every process learns of it below, instead of waiting forever
            error = e
    if jax.process_count() > 1:
        failed = multihost_utils.process_allgather(np.int32(error is not None))
        if error is None and np.any(failed):
            raise RuntimeError("process 0 could not export the model directory (see its log)")
    if error is not None:
        raise error
    return path


def summary_json(summary: Mapping) -> str:
    return json.dumps(summary, indent=1, default=float)
