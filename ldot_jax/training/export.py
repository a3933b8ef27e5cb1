"""Model directories from a run: the export at the end of training, and `ldot export` from any
kept checkpoint.

    ldot export --workdir runs/ft                 # the latest checkpoint → runs/ft/model
    ldot export --workdir runs/ft --best          # the best by train.best_metric
    ldot export --workdir runs/ft --step 4000 --out models/ft-4000

Checkpoints hold global arrays (Orbax), so a run trained on many processes exports from one.
The tokenizer a run trained with is saved in `<workdir>/tokenizer/` when training starts and
goes into every export, so a model directory alone is enough to query.
"""

from __future__ import annotations

import logging

from ldot_jax.checkpoints import checkpoint, kinds, pretrained
from ldot_jax.core import paths
from ldot_jax.core import workdir as workdir_lib
from ldot_jax.data import text_tokenizers

log = logging.getLogger(__name__)


def run_checkpointer(workdir: str, config) -> checkpoint.TrainCheckpointer:
    """A reader of a run's checkpoints (never removes anything: the run may be live)."""
    t = config.train
    return checkpoint.TrainCheckpointer(
        workdir_lib.checkpoints_dir(workdir), keep=max(1, int(t.get("keep_checkpoints") or 1)),
        best_metric=t.get("best_metric") or None, best_mode=t.get("best_mode", "max"),
        async_save=False)


def choose_step(ckpt: checkpoint.TrainCheckpointer, step: int | None = None,
                best: bool = False) -> int:
    """`step`, the best step by the run's best_metric, or the latest; errors list the kept
    steps."""
    steps = ckpt.all_steps()
    if step is not None and best:
        raise ValueError("export: give a step or best, not both")
    if not steps:
        raise checkpoint.CheckpointError(f"no checkpoint in {ckpt.directory}")
    if best:
        if not ckpt.best_metric:
            raise ValueError(f"{ckpt.directory}: the run sets no train.best_metric, so no "
                             f"checkpoint is best; export a --step (kept: {steps})")
        chosen = ckpt.best_step()
        if chosen is None:
            raise checkpoint.CheckpointError(
                f"{ckpt.directory}: no kept checkpoint was saved with {ckpt.best_metric!r} "
                f"(an evaluation writes it; kept: {steps})")
        return chosen
    if step is None:
        return steps[-1]
    if step not in steps:
        raise checkpoint.CheckpointError(f"no step {step} in {ckpt.directory} (kept: {steps})")
    return int(step)


def checkpoint_params(workdir: str, step: int):
    """The model parameters (NumPy pytree) of checkpoint `step`, read on this process alone:
    only the parameters (not the optimizer state), into host memory."""
    path = paths.join(workdir_lib.checkpoints_dir(workdir), str(step), checkpoint.STATE)
    return checkpoint.restore_subtree_to_host(path, ("params", "model"))


def write(workdir: str, kind: str, model_cfg, params, step: int, tokenizer=None,
          out: str | None = None, exported_by: str = "export",
          score: dict | None = None, normalize: bool | None = None) -> str:
    """Writes the model directory (default <workdir>/model) of host `params`. normalize: the
    run's loss.normalize, recorded so a gallery built from the model alone normalizes its
    vectors as the run's indexes do (retrieval/gallery.query_normalization)."""
    metadata = {"source": paths.absolute(workdir), "step": int(step),
                "exported_by": exported_by}
    if normalize is not None:
        metadata["normalize"] = bool(normalize)
    if score:
        metadata["best_metric"] = score
    path = pretrained.save_pretrained(out or workdir_lib.model_dir(workdir), kind, model_cfg,
                                      params, metadata=metadata, tokenizer=tokenizer)
    log.info("exported step %d of %s to %s", step, workdir, path)
    return path


def save_run_tokenizer(workdir: str, tokenizer) -> None:
    """Saves the run's tokenizer in <workdir>/tokenizer/ (call on one process); pre-tokenized
    data has none to save."""
    if isinstance(tokenizer, tuple(text_tokenizers.TOKENIZERS.values())):
        tokenizer.save(workdir_lib.tokenizer_dir(workdir))


def run_tokenizer(workdir: str):
    """The tokenizer saved in the run directory (None for runs without one)."""
    path = workdir_lib.tokenizer_dir(workdir)
    return text_tokenizers.load(path) if text_tokenizers.kind_of(path) else None


def export(workdir: str, step: int | None = None, best: bool = False, out: str | None = None,
           tokenizer=None) -> tuple[str, int]:
    """(model directory, step) of a run's checkpoint: `step`, the best one, or the latest.
    tokenizer: default the one the run saved."""
    workdir = paths.absolute(workdir)
    config = workdir_lib.load_config(workdir)
    kind = config.model_kind
    model_cfg = kinds.model_config(kind, config.model)
    if not paths.is_dir(workdir_lib.checkpoints_dir(workdir)):
        raise checkpoint.CheckpointError(f"{workdir} has no {workdir_lib.CHECKPOINTS}/: "
                                         f"nothing to export")
    with run_checkpointer(workdir, config) as ckpt:
        chosen = choose_step(ckpt, step, best)
        score = score_of(ckpt, chosen)
    tokenizer = tokenizer if tokenizer is not None else run_tokenizer(workdir)
    if tokenizer is None:
        log.warning("%s saved no tokenizer (older run, or pre-tokenized data): the model "
                    "directory will hold none; pass a vocabulary to include one", workdir)
    params = checkpoint_params(workdir, chosen)
    normalize = bool(config.loss.get("normalize", False))
    return write(workdir, kind, model_cfg, params, chosen, tokenizer, out, score=score,
                 normalize=normalize), chosen


def score_of(ckpt: checkpoint.TrainCheckpointer, step: int) -> dict | None:
    """{best_metric: its value saved with `step`} for a model directory's metadata, or None
    (no best_metric, or the step was saved without it)."""
    if not ckpt.best_metric:
        return None
    value = ckpt.metric(step)
    return None if value is None else {ckpt.best_metric: value}
