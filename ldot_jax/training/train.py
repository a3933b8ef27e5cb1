"""Training: `train_and_evaluate(config, workdir)` for pre-training and fine-tuning.

One `jax.jit` program per (task, batch shape) over a (data, model) mesh: params and optimizer
state replicated, batches B@data, the contrastive loss in a `shard_map` island (tasks.py,
contrastive.py). Each update runs ONE task drawn by mix ratio from (seed, step)
(`config.tasks`, e.g. {cmr: 16, vmlm: 8, mrfr: 4, mrckl: 4}); fine-tuning is {cmr: 1}.

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

import dataclasses
import json
import logging
import os
import signal
import threading
import time
from typing import Any, Mapping

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm
from jax.experimental import multihost_utils

from ldot_jax.checkpoints import checkpoint, initialize, pretrained
from ldot_jax.checkpoints import kinds
from ldot_jax.core import parallel
from ldot_jax.core import workdir as workdir_lib
from ldot_jax.data import datasets, pipeline
from ldot_jax.evaluation import recall
from ldot_jax.retrieval import extract
from ldot_jax.training import contrastive, optim, tasks
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


def loss_config(config) -> tasks.LossConfig:
    c = config.loss
    return tasks.LossConfig(
        contrastive=contrastive.ContrastiveConfig(
            kind=c.kind, negatives=c.negatives, same_image_positives=c.same_image_positives,
            normalize=c.normalize, chunk_size=c.get("chunk_size")),
        temperature=c.get("temperature"), learn_temperature=c.get("learn_temperature", False),
        matryoshka_dims=tuple(c.get("matryoshka_dims", ()) or ()),
        matryoshka_weights=tuple(c.get("matryoshka_weights", ()) or ()))


def pipeline_config(config) -> pipeline.PipelineConfig:
    c = config.pipeline
    return pipeline.PipelineConfig(
        batch_size=c.batch_size, text_buckets=tuple(c.text_buckets),
        region_buckets=tuple(c.region_buckets), max_text_len=c.max_text_len,
        length_policy=c.length_policy, seed=config.seed,
        mask_text="vmlm" in config.tasks, mask_regions=bool({"mrfr", "mrckl"} & set(
            config.tasks)), num_threads=c.num_threads, prefetch=c.prefetch,
        mined_negatives=c.get("mined_negatives"), mined_per_anchor=c.get("mined_per_anchor", 1))


def itm_config(config) -> tasks.ItmConfig:
    c = config.get("itm") or {}
    return tasks.ItmConfig(**{k: c[k] for k in (
        "itm_weight", "rank_weight", "list_weight", "negatives", "margin", "residual_scale",
        "sample_temperature", "normalize") if k in c})


def distill_config(config) -> tasks.DistillConfig:
    c = config.get("distill") or {}
    return tasks.DistillConfig(**{k: c[k] for k in ("weight", "temperature", "candidates",
                                                     "sample_temperature", "head") if k in c})


def frozen_models(config, names: tuple[str, ...]) -> tuple[dict, dict]:
    """The frozen models the tasks use: ({"dual": module, "teacher": module}, their params
    {"dual": …, "teacher": …}), from `itm.dual` and `distill.teacher` (model directories)."""
    wanted = {"dual": ("itm", "itm.dual", ("lightningdot", "lightningdot_pretrain")),
              "teacher": ("distill", "distill.teacher", ("uniter_itm",))}
    modules, params = {}, {}
    for name, (task, key, allowed) in wanted.items():
        section, field = key.split(".")
        directory = (config.get(section) or {}).get(field)
        if task not in names:
            continue
        if not directory:
            if name == "teacher":
                raise ValueError(f"task {task!r} needs {key}: a model directory of kind "
                                 f"{allowed[0]!r}")
            log.warning("itm.dual is not set: negatives are drawn uniformly, not hard")
            continue
        loaded = pretrained.load_pretrained(directory)
        if loaded.kind not in allowed:
            raise ValueError(f"{key}={directory} holds a {loaded.kind!r} model; expected "
                             f"{' or '.join(allowed)}")
        modules[name] = pretrained.build_model(loaded.kind, loaded.config)
        params[name] = loaded.params
    return modules, params


def model_and_config(config):
    """(kind, model config dataclass, Flax module)."""
    kind = config.model_kind
    model_config = kinds.model_config(kind, config.model)
    return kind, model_config, pretrained.build_model(kind, model_config)


def _check_tokenizer(tokenizer, model_config) -> None:
    if tokenizer is None:
        return
    vocab = getattr(tokenizer, "vocab_size", None)
    sides = ("transformer",) if hasattr(model_config, "transformer") else ("text", "image")
    for side in sides:
        size = getattr(model_config, side).vocab_size
        if vocab is not None and vocab > size:
            raise ValueError(f"the tokenizer has {vocab} tokens but model.{side}.vocab_size="
                             f"{size}")
    if getattr(model_config, "cls_token_id", tokenizer.cls_id) != tokenizer.cls_id:
        raise ValueError(f"model.cls_token_id={model_config.cls_token_id} but the tokenizer's "
                         f"[CLS] is {tokenizer.cls_id}")


@dataclasses.dataclass
class TrainData:
    iterator: Any
    index: pipeline.CaptionIndex
    tokenizer: Any
    eval_images: Any = None
    eval_index: pipeline.CaptionIndex | None = None


def load_data(config) -> TrainData:
    """The training iterator (this process's rows) and the evaluation split. Process 0
    prepares the dataset on first use while the others wait."""
    c = config.data
    dataset = datasets.load_for_run(c)
    pcfg = pipeline_config(config)
    index = pipeline.build_caption_index(dataset.caption_table(c.train_split), dataset.tokenizer,
                                         pcfg.max_text_len, pcfg.length_policy, c.train_split)
    iterator = iter(pipeline.training_dataset(dataset.split(c.train_split), index,
                                              dataset.tokenizer, pcfg, jax.process_index(),
                                              jax.process_count()))
    data = TrainData(iterator, index, dataset.tokenizer)
    if c.get("eval_split"):
        data.eval_images = dataset.split(c.eval_split)
        data.eval_index = extract.eval_caption_index(
            dataset.caption_table(c.eval_split), dataset.tokenizer, c.eval_split, config)
    return data


def total_steps(config, index: pipeline.CaptionIndex) -> int:
    """Data batches of the run: train.num_steps, or train.num_epochs × steps per epoch."""
    t = config.train
    if t.get("num_steps"):
        return int(t.num_steps)
    if not t.get("num_epochs"):
        raise ValueError("train: set num_steps or num_epochs")
    per_epoch = pipeline.steps_per_epoch(index, pipeline_config(config), jax.process_count())
    return max(1, int(round(t.num_epochs * per_epoch)))


def init_state(config, kind: str, model_config, tx, mesh,
               load_pretrained: bool = True) -> TrainState:
    """A fresh replicated TrainState (params from the seed, then `config.init` sources)."""
    params = jax.device_get(pretrained.init_params(kind, model_config,
                                                   jax.random.key(config.seed)))
    if load_pretrained:
        sources = {k: config.init.get(k) for k in initialize.TARGETS}
        params = initialize.from_pretrained(params, kind, sources)
    params = {"model": params, **jax.device_get(loss_config(config).init_params())}
    params = parallel.replicate(params, mesh)
    with jax.set_mesh(mesh):
        opt_state = jax.jit(tx.init)(params)
        step = jax.device_put(jnp.zeros((), jnp.int32), parallel.replicated(mesh))
    return TrainState(step, params, opt_state)


def make_train_step(task: str, setup: tasks.TaskSetup, tx: optax.GradientTransformation):
    """Jitted (state, batch, key, frozen) → (state, metrics) for one task; state is donated.
    `frozen`: params of the frozen models ({"dual"}, {"teacher"} or {}), replicated, seen by
    the task beside state.params and never differentiated."""
    task_loss = tasks.task_fn(task)

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
# Evaluation


def evaluate_retrieval(model, params, data: TrainData, config, mesh,
                       progress: bool = False) -> dict[str, float]:
    """Dot-product IR / TR recall on the evaluation split (every image and caption once)."""
    image_vectors, text_vectors, caption_image = extract.embed_split(
        model, params, data.eval_images, data.eval_index, config, mesh, progress)
    return recall.retrieval_metrics(text_vectors, image_vectors, caption_image)


def make_evaluator(kind: str, model, data: TrainData, config, mesh, frozen_modules: dict,
                   frozen: dict):
    """fn(model params, progress) → eval metrics, or None when the run does not recall.
    Dual encoders: dot-product recall on the eval split. The cross-encoder: recall after it
    re-ranks the top `itm.eval_top` of the frozen dual encoder (itm.dual)."""
    if data.eval_images is None:
        return None
    if kind != "uniter_itm":
        return lambda params, progress: evaluate_retrieval(model, params, data, config, mesh,
                                                           progress)
    if "dual" not in frozen_modules:
        log.warning("the cross-encoder is not evaluated during training: itm.dual is not set")
        return None
    from ldot_jax.evaluation import two_stage  # the evaluation of the slow stage builds on training
    dual = (frozen_modules["dual"], frozen["dual"])
    return lambda params, progress: two_stage.rerank_recall(
        dual, (model, params), data.eval_images, data.eval_index, config, mesh,
        top=int(config.itm.get("eval_top", 20)), progress=progress)


# ---------------------------------------------------------------------------------------------
# The loop


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains (resuming from <workdir>/checkpoints if present) and evaluates.

    Returns {"step", "preempted", "train": last logged train metrics, "eval": last eval
    metrics}. Writes <workdir>/config.json, metrics.jsonl, tensorboard/, checkpoints/ and, at
    the end of a single-process run, model/ (a model directory for `load_dual_encoder`).
    """
    workdir = os.path.abspath(workdir)
    t = config.train
    mesh = parallel.make_mesh(config.mesh.data, config.mesh.model)
    parallel.check_global_batch(config.pipeline.batch_size, mesh)
    if jax.process_index() == 0:
        workdir_lib.save_config(config, workdir)
    kind, model_cfg, model = model_and_config(config)
    names, probabilities = tasks.check_mix(dict(config.tasks))
    kinds.check_tasks(kind, names)
    frozen_modules, frozen = frozen_models(config, names)
    frozen = parallel.replicate(frozen, mesh)
    data = load_data(config)
    _check_tokenizer(data.tokenizer, model_cfg)
    steps = total_steps(config, data.index)
    accumulation = int(config.optimizer.get("accumulation_steps", 1) or 1)
    setup = tasks.TaskSetup(model, mesh, loss_config(config), itm_config(config),
                            distill_config(config), **frozen_modules)

    ckpt = checkpoint.TrainCheckpointer(
        workdir_lib.checkpoints_dir(workdir), keep=t.keep_checkpoints,
        best_metric=t.get("best_metric"), best_mode=t.get("best_mode", "max"),
        async_save=t.get("async_checkpoints", True))
    resuming = ckpt.latest_step() is not None
    abstract_params = {"model": pretrained.abstract_params(kind, model_cfg),
                       **jax.eval_shape(setup.loss.init_params)}
    tx, schedule = optim.make_optimizer(config.optimizer, max(1, steps // accumulation),
                                        abstract_params)
    state = init_state(config, kind, model_cfg, tx, mesh, load_pretrained=not resuming)
    if resuming:
        state, data_state = ckpt.restore(_abstract(state))
        data.iterator.set_state(data_state)
        log.info("resumed from %s at step %d", ckpt.directory, int(state.step))
    start = int(parallel.to_host(state.step))

    evaluator = make_evaluator(kind, model, data, config, mesh, frozen_modules, frozen)
    writer = MetricWriter(workdir, enabled=jax.process_index() == 0,
                          tensorboard=t.get("tensorboard", True))
    step_fns = {name: make_train_step(name, setup, tx) for name in names}
    key = parallel.replicate(jax.random.key_data(jax.random.key(config.seed)), mesh)
    key = jax.random.wrap_key_data(key)
    preemption = Preemption()
    stop_at = min(steps, t.get("stop_at") or steps)
    summary = {"step": start, "preempted": False, "train": {}, "eval": {}}
    progress = tqdm.tqdm(total=stop_at, initial=start, desc="train", unit="step",
                         disable=jax.process_index() != 0 or not t.get("progress_bar", True),
                         mininterval=2.0)
    window: dict[str, list] = {}
    window_start, window_steps = time.perf_counter(), 0
    pending = None  # the previous step's (step, task, metrics): read one step late

    def settle():
        """Reads the pending step's metrics (stops on a non-finite loss) into the window."""
        nonlocal pending
        if pending is None:
            return
        (step, task, metrics), pending = pending, None
        metrics = jax.device_get(metrics)
        if not bool(metrics["finite"]):
            ckpt.wait()
            raise NonFiniteLossError(
                f"step {step} (task {task}): non-finite loss {float(metrics['loss'])} or "
                f"gradient norm {float(metrics['grad_norm'])}; the update was not applied and "
                f"training stopped. Last good checkpoint: step {ckpt.latest_step()} in "
                f"{ckpt.directory}")
        for k, v in metrics.items():
            if k not in ("finite", "loss"):  # the task's own "<task>_loss" is in the metrics
                window.setdefault(k, []).append(float(v))

    try:
        with jax.set_mesh(mesh):
            for step in range(start, stop_at):
                task = tasks.task_of_step(step, names, probabilities, config.seed)
                batch = parallel.global_batch(next(data.iterator), mesh)
                state, metrics = step_fns[task](state, batch, key, frozen)
                settle()
                pending = (step, task, metrics)
                done = step + 1
                window_steps += 1
                progress.update(1)
                if done % t.log_every == 0 or done == stop_at:
                    settle()
                    elapsed = time.perf_counter() - window_start
                    row = {k: float(np.mean(v)) for k, v in window.items()}
                    row["learning_rate"] = float(schedule(done // accumulation))
                    row["steps_per_sec"] = window_steps / elapsed
                    row["examples_per_sec"] = row["steps_per_sec"] * config.pipeline.batch_size
                    writer.write(done, row, "train")
                    summary["train"] = row
                    progress.set_postfix({k: f"{v:.3f}" for k, v in row.items()
                                          if k.endswith("_loss")})
                    window, window_start, window_steps = {}, time.perf_counter(), 0
                evaluate_now = evaluator is not None and (
                    (t.get("eval_every") and done % t.eval_every == 0) or done == steps)
                eval_metrics = None
                if evaluate_now:
                    eval_metrics = evaluator(state.params["model"], not progress.disable)
                    writer.write(done, eval_metrics, "eval")
                    summary["eval"] = eval_metrics
                preempted = preemption.reached(done)
                if (preempted or eval_metrics is not None or done == stop_at
                        or (t.get("checkpoint_every") and done % t.checkpoint_every == 0)):
                    settle()  # never save after a non-finite step
                    ckpt.save(done, state, data.iterator.get_state(),
                              metrics=eval_metrics if t.get("best_metric") else None)
                summary["step"] = done
                if preempted:
                    log.warning("preempted: checkpoint of step %d saved, stopping", done)
                    summary["preempted"] = True
                    break
            settle()
        ckpt.wait()
        if jax.process_count() == 1 and summary["step"] == steps and t.get("export", True):
            export_model(workdir, kind, model_cfg, state.params["model"], data.tokenizer)
    finally:
        progress.close()
        preemption.close()
        writer.close()
        ckpt.close()
    return summary


def export_model(workdir: str, kind: str, model_cfg, model_params, tokenizer=None) -> str:
    """Writes <workdir>/model, a model directory (`ldot_jax.load_dual_encoder` reads it)."""
    path = workdir_lib.model_dir(workdir)
    host = jax.device_get(parallel.to_host(model_params))
    return pretrained.save_pretrained(path, kind, model_cfg, host,
                                      metadata={"source": workdir, "exported_by": "train"},
                                      tokenizer=tokenizer)


def summary_json(summary: Mapping) -> str:
    return json.dumps(summary, indent=1, default=float)
