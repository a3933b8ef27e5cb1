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
  mrckl   masked-region class distribution (KL to the detector's soft labels);
  itm     the cross-encoder (re-ranker): each caption with its image, with a hard negative
          image and each image with a hard negative caption, drawn from a frozen dual
          encoder's scores over the global batch (hard_negatives.py); UNITER's 2-way ITM
          cross-entropy and rank hinge;
  distill the dual encoder's CMR loss plus KL(softmax(s_cross / T) ‖ softmax(s_dual / T))·T²
          over each query's positive and sampled in-batch candidates, scored by a frozen
          cross-encoder (Thinking Fast and Slow).
Frozen models' params arrive in `params` beside the trained ones: params["dual"] (itm) and
params["teacher"] (distill); the train step never differentiates them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from ldot_jax.core import numerics
from ldot_jax.data import masking
from ldot_jax.models.cross_encoder import CrossEncoder
from ldot_jax.models.pretraining import DualEncoderForPretraining
from ldot_jax.training import contrastive, hard_negatives, losses


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
class ItmConfig:
    """The cross-encoder objective (task itm).

    itm_weight / rank_weight / list_weight: weights of the 2-way ITM cross-entropy, of
    UNITER's rank hinge and of the listwise softmax over the positive and its negatives
    (localized contrastive estimation, Gao et al. 2021: far more signal per pair than the
    pointwise losses when the negatives are hard); negatives: k hard negatives per positive
    and direction (UNITER's hard-negative fine-tuning draws many); margin: the hinge margin
    (UNITER: 0.2); residual_scale: the listwise loss scores a pair as residual_scale · dual
    score + rank logit, so the cross-encoder learns a correction to the fast stage and is
    meant to re-rank fused with α = residual_scale (`rerank.fuse`); None: the rank logit alone
    (LightningDOT). sample_temperature: negatives are drawn ∝
    softmax(dual score / T) (None: uniformly among other images' rows; also what happens
    without a dual encoder); normalize: the dual scores are cosines (towers trained with
    loss.normalize), else raw dot products (LightningDOT).
    """

    itm_weight: float = 1.0
    rank_weight: float = 1.0
    list_weight: float = 0.0
    negatives: int = 1
    margin: float = 0.2
    residual_scale: float | None = None
    sample_temperature: float | None = 1.0
    normalize: bool = False

    def __post_init__(self):
        weights = {"itm_weight": self.itm_weight, "rank_weight": self.rank_weight,
                   "list_weight": self.list_weight}
        if min(weights.values()) < 0 or sum(weights.values()) == 0:
            raise ValueError(f"itm weights {weights}: expected ≥ 0 and not all 0")
        if self.negatives < 1:
            raise ValueError(f"itm.negatives={self.negatives}: expected ≥ 1")
        if self.residual_scale is not None and self.residual_scale <= 0:
            raise ValueError(f"itm.residual_scale={self.residual_scale}: expected > 0 or None")
        if self.sample_temperature is not None and self.sample_temperature <= 0:
            raise ValueError(f"itm.sample_temperature={self.sample_temperature}: expected > 0")


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    """Distillation from the cross-encoder into the towers (task distill).

    weight: of the KL term (added to the CMR loss); temperature: T of both softmaxes;
    candidates: K per query (its positive + K − 1 drawn from the batch ∝ softmax(dual score /
    sample_temperature), other images only), in both directions; head: the teacher's score,
    "rank" or "itm" (the match log-odds).
    """

    weight: float = 1.0
    temperature: float = 1.0
    candidates: int = 8
    sample_temperature: float | None = 1.0
    head: str = "rank"

    def __post_init__(self):
        if self.weight < 0 or self.temperature <= 0 or self.candidates < 2:
            raise ValueError(f"distill: weight={self.weight} (≥ 0), temperature="
                             f"{self.temperature} (> 0), candidates={self.candidates} (≥ 2)")
        if self.head not in ("rank", "itm"):
            raise ValueError(f"distill.head={self.head!r}: expected 'rank' or 'itm'")


@dataclasses.dataclass(frozen=True)
class TaskSetup:
    """What every task needs besides params, batch and rng (hashable: a jit static).

    dual: the frozen dual encoder that draws the itm task's negatives (None: uniform);
    teacher: the frozen cross-encoder of the distill task.
    """

    model: Any  # DualEncoder, DualEncoderForPretraining or CrossEncoder
    mesh: jax.sharding.Mesh | None
    loss: LossConfig = LossConfig()
    itm: ItmConfig = ItmConfig()
    distill: DistillConfig = DistillConfig()
    dual: Any = None
    teacher: Any = None


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
    return _cmr_loss(params, batch, setup, text, image)


def _cmr_loss(params, batch, setup: TaskSetup, text, image):
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


# ---------------------------------------------------------------------------------------------
# The slow stage: training the cross-encoder, distilling it into the towers


def _take(setup: TaskSetup, batch, keys, index):
    """The batch fields `keys` at global rows index i32[B] (across devices)."""
    return {k: hard_negatives.gather(setup.mesh, batch[k], index[:, None])[:, 0] for k in keys}


TEXT_KEYS = ("input_ids", "attention_mask")
IMAGE_KEYS = ("region_feat", "boxes", "region_mask")


def _cross(setup_model, params, text, image, rng, deterministic):
    return setup_model.apply({"params": params}, text["input_ids"], text["attention_mask"],
                             image["region_feat"], image["boxes"], image["region_mask"],
                             deterministic=deterministic, rngs={"dropout": rng})


def itm(params, batch, rng, setup: TaskSetup):
    """The re-ranker's loss over B positives, B·k hard negative images (k per caption) and B·k
    hard negative captions (k per image), all drawn from the global batch.

    The ITM cross-entropy weighs each negative 1 / k, so positives keep a third of its weight
    whatever k; the rank hinge and the listwise loss average both directions."""
    if not isinstance(setup.model, CrossEncoder):
        raise ValueError(f"task 'itm' trains the cross-encoder (model kind 'uniter_itm'), got "
                         f"{type(setup.model).__name__}")
    cfg = setup.itm
    k = cfg.negatives
    sample_key, positive_key, *dropout = jax.random.split(rng, 2 + 2 * k)
    group, valid = batch["image_index"], batch["valid"]
    temperature = cfg.sample_temperature
    if setup.dual is not None:
        dual_setup = dataclasses.replace(setup, model=setup.dual)
        text, image = jax.lax.stop_gradient(embed_pair(dual_setup, params["dual"], batch, rng,
                                                       deterministic=True))
        if cfg.normalize:
            text, image = numerics.l2_normalize(text), numerics.l2_normalize(image)
    elif cfg.residual_scale is not None:
        raise ValueError("itm.residual_scale needs the dual encoder's scores (itm.dual)")
    else:  # no dual encoder: uniform among other images' rows
        text = image = jnp.zeros((group.shape[0], 1), jnp.float32)
        temperature = None
    text_key, image_key = jax.random.split(sample_key)
    neg_image, image_found = hard_negatives.mine(setup.mesh, text, image, group, valid,
                                                 text_key, temperature, k)
    neg_text, text_found = hard_negatives.mine(setup.mesh, image, text, group, valid,
                                               image_key, temperature, k)
    captions = {name: batch[name] for name in TEXT_KEYS}
    images = {name: batch[name] for name in IMAGE_KEYS}
    positive = _cross(setup.model, params["model"], captions, images, positive_key, False)
    # One fixed-shape pass of B pairs per negative slot (k is small; a Python loop keeps
    # every pass sharded B@data like the batch).
    with_neg_image = [_cross(setup.model, params["model"], captions,
                             _take(setup, batch, IMAGE_KEYS, neg_image[:, j]), dropout[j], False)
                      for j in range(k)]
    with_neg_text = [_cross(setup.model, params["model"],
                            _take(setup, batch, TEXT_KEYS, neg_text[:, j]), images,
                            dropout[k + j], False) for j in range(k)]
    logits = jnp.concatenate([positive.itm_logits]
                             + [o.itm_logits for o in with_neg_image + with_neg_text])
    labels = jnp.concatenate([jnp.ones_like(group)] + [jnp.zeros_like(group)] * (2 * k))
    found = jnp.concatenate([valid] + [image_found[:, j] for j in range(k)]
                            + [text_found[:, j] for j in range(k)])
    ones = jnp.ones_like(group, jnp.float32)  # sharded like the batch
    weights = found.astype(jnp.float32) * jnp.concatenate([ones] + [ones / k] * (2 * k))
    itm_loss = losses.itm_loss(logits, labels, weights)
    neg_image_scores = jnp.stack([o.rank_score for o in with_neg_image], axis=1)  # [B, k]
    neg_text_scores = jnp.stack([o.rank_score for o in with_neg_text], axis=1)
    rank = 0.5 * (losses.rank_hinge_loss(positive.rank_score, neg_image_scores, image_found,
                                         cfg.margin)
                  + losses.rank_hinge_loss(positive.rank_score, neg_text_scores, text_found,
                                           cfg.margin))
    list_positive = positive.rank_score
    if cfg.residual_scale is not None:  # + the dual's own score of each pair
        scale = cfg.residual_scale
        list_positive = list_positive + scale * jnp.sum(text * image, axis=-1)
        neg_image_scores = neg_image_scores + scale * hard_negatives.candidate_scores(
            setup.mesh, text, image, neg_image)
        neg_text_scores = neg_text_scores + scale * hard_negatives.candidate_scores(
            setup.mesh, image, text, neg_text)
    listwise = 0.5 * (losses.listwise_rank_loss(list_positive, neg_image_scores,
                                                image_found, valid)
                      + losses.listwise_rank_loss(list_positive, neg_text_scores,
                                                  text_found, valid))
    correct = (jnp.argmax(logits, -1) == labels) & found
    metrics = {"itm_loss": itm_loss, "rank_loss": rank, "list_loss": listwise,
               "itm_accuracy": jnp.sum(correct) / jnp.maximum(jnp.sum(found), 1)}
    total = cfg.itm_weight * itm_loss + cfg.rank_weight * rank + cfg.list_weight * listwise
    return total, metrics


def _teacher_scores(setup: TaskSetup, params, captions, images):
    out = _cross(setup.teacher, params["teacher"], captions, images, jax.random.key(0), True)
    if setup.distill.head == "itm":
        return out.itm_logits[:, 1] - out.itm_logits[:, 0]
    return out.rank_score


def distill(params, batch, rng, setup: TaskSetup):
    """CMR + weight · KL distillation from the frozen cross-encoder, both directions: each
    caption over its image and K − 1 drawn images, each image over its caption and K − 1 drawn
    captions. The student scores are the towers' dot products (the CMR loss's scores)."""
    if setup.teacher is None or "teacher" not in params:
        raise ValueError("task 'distill' needs a teacher cross-encoder (distill.teacher: a "
                         "uniter_itm model directory)")
    cfg = setup.distill
    dropout_key, sample_key = jax.random.split(rng)
    text, image = embed_pair(setup, params["model"], batch, dropout_key)
    loss, metrics = _cmr_loss(params, batch, setup, text, image)
    group, valid = batch["image_index"], batch["valid"]
    rows = hard_negatives.row_ids(setup.mesh, group.shape[0])
    scale, _ = _scale_bias(setup, params)
    kd = []
    for direction, (queries, keys), key in zip(
            ("t2i", "i2t"), ((text, image), (image, text)), jax.random.split(sample_key)):
        drawn, found = hard_negatives.mine(setup.mesh, queries, keys, group, valid, key,
                                           cfg.sample_temperature, cfg.candidates - 1)
        candidates = jnp.concatenate([rows[:, None], drawn], axis=1)  # [B, K]: positive first
        mask = jnp.concatenate([valid[:, None], found], axis=1)
        # The student's scores are the CMR loss's: (normalized) dot products × scale.
        q, k = ((numerics.l2_normalize(x) for x in (queries, keys))
                if setup.loss.contrastive.normalize else (queries, keys))
        student = scale * hard_negatives.candidate_scores(setup.mesh, q, k, candidates)
        teacher = []
        for j in range(cfg.candidates):
            if direction == "t2i":
                captions = {k: batch[k] for k in TEXT_KEYS}
                images = _take(setup, batch, IMAGE_KEYS, candidates[:, j])
            else:
                captions = _take(setup, batch, TEXT_KEYS, candidates[:, j])
                images = {k: batch[k] for k in IMAGE_KEYS}
            teacher.append(_teacher_scores(setup, params, captions, images))
        teacher = jnp.stack(teacher, axis=1)
        per_row = losses.distillation_loss_per_row(student, teacher, mask, cfg.temperature)
        kd.append(jnp.sum(per_row * valid) / jnp.maximum(jnp.sum(valid), 1))
        metrics[f"distill_{direction}"] = kd[-1]
    kd_loss = 0.5 * (kd[0] + kd[1])
    metrics["distill_loss"] = kd_loss
    return loss + cfg.weight * kd_loss, metrics


TASKS: dict[str, Callable] = {"cmr": cmr, "vmlm": vmlm, "mrfr": mrfr, "mrckl": mrckl,
                              "itm": itm, "distill": distill}


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
