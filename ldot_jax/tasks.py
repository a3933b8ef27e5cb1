"""Training objectives as pure functions of (params, batch, rng): CMR, VMLM, MRFR, MRC-kl.

Every task has the signature
    loss, metrics = TASKS[name](params, batch, rng, setup)
where `params` = {"model": the Flax params, ["contrastive": {"log_scale", "bias"}]}, `batch`
is a global batch [B@data, ...] (pipeline layout, see data/pipeline.py), `rng` the dropout key
and `setup` a `TaskSetup` (model, mesh, loss settings). Losses are averaged over the global
batch (all masked tokens / regions of all devices), so a run gives the same numbers on any
number of devices and processes; within a batch they average as the original does.

  cmr     the in-batch contrastive loss (contrastive.py): LightningDOT's CMR / fine-tuning
          loss by default, with the options of `ContrastiveConfig`, learnable temperature and
          Matryoshka prefixes (HiVLP);
  vmlm    masked-token prediction from text states + the image tower's raw [CLS] state;
  mrfr    masked-region feature regression from region states + the text tower's [CLS] state;
  mrckl   masked-region class distribution (KL to the detector's soft labels).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from ldot_jax import contrastive, losses
from ldot_jax.data import masking
from ldot_jax.models.dual_encoder import DualEncoder
from ldot_jax.models.pretraining import DualEncoderForPretraining


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """The CMR loss: `contrastive` options, the temperature and Matryoshka prefixes.

    temperature: None → raw dot products (the original); a float → fixed 1 / temperature scale;
    learn_temperature: the scale is a parameter (params["contrastive"]["log_scale"]),
      initialized at 1 / temperature.
    matryoshka_dims / weights: the loss also on these embedding prefixes (HiVLP), each weighted;
      the full dimension is always included with weight 1 unless listed.
    sigmoid_bias: initial bias of the sigmoid loss (learned with the temperature).
    """

    contrastive: contrastive.ContrastiveConfig = contrastive.ContrastiveConfig()
    temperature: float | None = None
    learn_temperature: bool = False
    matryoshka_dims: tuple[int, ...] = ()
    matryoshka_weights: tuple[float, ...] = ()
    sigmoid_bias: float = -10.0

    def __post_init__(self):
        if self.learn_temperature and self.temperature is None:
            raise ValueError("loss.learn_temperature needs loss.temperature (its initial value)")
        if self.temperature is not None and self.temperature <= 0:
            raise ValueError(f"loss.temperature={self.temperature}: expected > 0")
        if self.matryoshka_weights and len(self.matryoshka_weights) != len(
                self.matryoshka_dims):
            raise ValueError(f"loss.matryoshka_weights {self.matryoshka_weights} do not match "
                             f"matryoshka_dims {self.matryoshka_dims}")

    def init_params(self) -> dict:
        """The loss's own trainable parameters ({} unless the temperature is learned)."""
        if not self.learn_temperature:
            return {}
        out = {"log_scale": jnp.asarray(np.log(1.0 / self.temperature), jnp.float32)}
        if self.contrastive.kind == "sigmoid":
            out["bias"] = jnp.asarray(self.sigmoid_bias, jnp.float32)
        return {"contrastive": out}


@dataclasses.dataclass(frozen=True)
class TaskSetup:
    """What every task needs besides params, batch and rng (hashable: a jit static)."""

    model: Any  # DualEncoder or DualEncoderForPretraining
    mesh: jax.sharding.Mesh | None
    loss: LossConfig = LossConfig()


def _dual(module):
    return module.dual_encoder if isinstance(module, DualEncoderForPretraining) else module


def embed_pair(setup: TaskSetup, model_params, batch, rng, deterministic: bool = False):
    """(text f32[B, P], image f32[B, P]) retrieval vectors of a batch's captions and images."""
    def both(module):
        dual = _dual(module)
        text = dual.encode_text(batch["input_ids"], batch["attention_mask"], deterministic)
        image = dual.encode_image(batch["region_feat"], batch["boxes"], batch["region_mask"],
                                  deterministic)
        return text, image
    return setup.model.apply({"params": model_params}, method=both, rngs={"dropout": rng})


def _scale_bias(setup: TaskSetup, params):
    cfg = setup.loss
    if cfg.learn_temperature:
        p = params["contrastive"]
        return jnp.exp(p["log_scale"]), p.get("bias", 0.0)
    scale = 1.0 if cfg.temperature is None else 1.0 / cfg.temperature
    bias = cfg.sigmoid_bias if cfg.contrastive.kind == "sigmoid" else 0.0
    return scale, bias


def cmr(params, batch, rng, setup: TaskSetup):
    """Cross-modal retrieval: the in-batch contrastive loss of (caption, image) pairs."""
    text, image = embed_pair(setup, params["model"], batch, rng)
    scale, bias = _scale_bias(setup, params)
    cfg = setup.loss
    group, valid = batch["image_index"], batch["valid"]
    loss = contrastive.contrastive_loss(text, image, group, valid, setup.mesh, cfg.contrastive,
                                        scale, bias)
    metrics = {"cmr_loss": loss, "temperature": 1.0 / jnp.asarray(scale, jnp.float32)}
    if cfg.matryoshka_dims:
        full_dim = text.shape[-1]
        if max(cfg.matryoshka_dims) > full_dim:
            raise ValueError(f"loss.matryoshka_dims {cfg.matryoshka_dims} exceed the embedding "
                             f"size {full_dim}")
        weights = dict(zip(cfg.matryoshka_dims,
                           cfg.matryoshka_weights or (1.0,) * len(cfg.matryoshka_dims)))
        loss = weights.pop(full_dim, 1.0) * loss
        for d, w in weights.items():
            prefix = contrastive.contrastive_loss(text[:, :d], image[:, :d], group, valid,
                                                  setup.mesh, cfg.contrastive, scale, bias)
            metrics[f"cmr_loss_{d}d"] = prefix
            loss = loss + w * prefix
    return loss, metrics


def _pretraining_model(setup: TaskSetup, task: str):
    if not isinstance(setup.model, DualEncoderForPretraining):
        raise ValueError(f"task {task!r} needs the pre-training model (model kind "
                         f"'lightningdot_pretrain'), got {type(setup.model).__name__}")
    return setup.model


def vmlm_positions(labels):
    """labels i32[B, L] (-1: not predicted) → (positions i32[B, M], labels i32[B, M]) of the
    masked tokens first, M = masking.max_predictions(L) (a static shape; -1 labels pad)."""
    count = masking.max_predictions(labels.shape[1])
    order = jnp.argsort(labels == -1, axis=1, stable=True)[:, :count]
    return order.astype(jnp.int32), jnp.take_along_axis(labels, order, axis=1)


def vmlm(params, batch, rng, setup: TaskSetup):
    """Visual-embedding MLM: cross-entropy over every masked token of the global batch."""
    model = _pretraining_model(setup, "vmlm")
    positions, labels = vmlm_positions(batch["vmlm_labels"])
    labels = jnp.where(batch["valid"][:, None], labels, -1)
    logits = model.apply({"params": params["model"]}, batch["vmlm_input_ids"],
                         batch["attention_mask"], batch["region_feat"], batch["boxes"],
                         batch["region_mask"], positions, deterministic=False,
                         method=DualEncoderForPretraining.vmlm_logits, rngs={"dropout": rng})
    loss = losses.masked_lm_loss(logits, labels)
    accuracy = jnp.sum((jnp.argmax(logits, -1) == labels) & (labels != -1)) / jnp.maximum(
        jnp.sum(labels != -1), 1)
    return loss, {"vmlm_loss": loss, "vmlm_accuracy": accuracy}


def _masked_regions(batch):
    return batch["region_masked"] & batch["valid"][:, None]


def mrfr(params, batch, rng, setup: TaskSetup):
    """Masked region feature regression: MSE over every element of the masked regions."""
    model = _pretraining_model(setup, "mrfr")
    masked = _masked_regions(batch)
    prediction = model.apply({"params": params["model"]}, batch["input_ids"],
                             batch["attention_mask"], batch["region_feat"], batch["boxes"],
                             batch["region_mask"], masked, deterministic=False,
                             method=DualEncoderForPretraining.mrfr_prediction,
                             rngs={"dropout": rng})
    loss = losses.mrfr_loss(prediction, batch["region_feat"], masked)
    return loss, {"mrfr_loss": loss}


def mrckl(params, batch, rng, setup: TaskSetup):
    """Masked region classification with KL divergence to the detector's soft labels."""
    model = _pretraining_model(setup, "mrckl")
    if "soft_labels" not in batch:
        raise ValueError("task 'mrckl' needs soft_labels f32[B, R, C] in the batch: a dataset "
                         "with region class distributions (scenes has them; convert UNITER "
                         "LMDBs with soft_labels=True)")
    masked = _masked_regions(batch)
    logits = model.apply({"params": params["model"]}, batch["input_ids"],
                         batch["attention_mask"], batch["region_feat"], batch["boxes"],
                         batch["region_mask"], masked, deterministic=False,
                         method=DualEncoderForPretraining.mrc_logits, rngs={"dropout": rng})
    if logits.shape[-1] != batch["soft_labels"].shape[-1]:
        raise ValueError(f"mrckl: the model predicts {logits.shape[-1]} classes, the data's "
                         f"soft_labels have {batch['soft_labels'].shape[-1]}")
    loss = losses.mrc_kl_loss(logits, batch["soft_labels"], masked)
    return loss, {"mrckl_loss": loss}


TASKS: dict[str, Callable] = {"cmr": cmr, "vmlm": vmlm, "mrfr": mrfr, "mrckl": mrckl}


def task_fn(name: str) -> Callable:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; valid tasks are {sorted(TASKS)}")
    return TASKS[name]


def check_mix(mix: dict[str, float]) -> tuple[tuple[str, ...], np.ndarray]:
    """{task: ratio} → (names, probabilities). The original's defaults are ratios like
    {cmr: 16, vmlm: 8, mrfr: 4, mrckl: 4} (COCO / SBU) or {16, 12, 6, 6} (VG / CC)."""
    if not mix:
        raise ValueError("tasks: no task to train (give at least one {task: ratio})")
    names = tuple(sorted(mix))
    for name in names:
        task_fn(name)
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


def model_for_kind(kind: str, config):
    if kind == "lightningdot":
        return DualEncoder(config)
    if kind == "lightningdot_pretrain":
        return DualEncoderForPretraining(config)
    raise ValueError(f"model kind {kind!r} cannot be trained here; use 'lightningdot' "
                     f"(fine-tuning, cmr only) or 'lightningdot_pretrain' (all tasks)")
