"""Task distill (Thinking Fast and Slow): the dual encoder's CMR loss plus
KL(softmax(s_cross / T) ‖ softmax(s_dual / T))·T² over each query's positive and sampled
in-batch candidates, scored by a frozen cross-encoder. Sections `loss` (the CMR term) and
`distill` (DistillConfig); frozen model "teacher" from `distill.teacher` (required)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from ldot_jax.core import numerics
from ldot_jax.models.cross_encoder import CrossEncoder
from ldot_jax.training import hard_negatives, losses
from ldot_jax.training.tasks import cmr, common
from ldot_jax.training.tasks.common import LossConfig

TEACHER_KIND = "uniter_itm"


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    """Distillation from the cross-encoder into the towers (task distill).

    weight: of the KL term (added to the CMR loss); temperature: T of both softmaxes;
    candidates: K per query (its positive + K − 1 drawn from the batch ∝ softmax(dual score /
    sample_temperature), other images only), in both directions; head: the teacher's score,
    "rank" or "itm" (the match log-odds). residual: the teacher's score of a pair is the
    student's own (scaled, not differentiated) score plus the cross-encoder's — the fused
    score a re-ranker trained as a correction to the fast stage (itm.residual_scale) is meant
    for — so the KL asks the towers to add the re-ranker's correction, not to copy a score
    that was never trained to rank alone.
    """

    weight: float = 1.0
    temperature: float = 1.0
    candidates: int = 8
    sample_temperature: float | None = 1.0
    head: str = "rank"
    residual: bool = False

    def __post_init__(self):
        if self.weight < 0 or self.temperature <= 0 or self.candidates < 2:
            raise ValueError(f"distill: weight={self.weight} (≥ 0), temperature="
                             f"{self.temperature} (> 0), candidates={self.candidates} (≥ 2)")
        if self.head not in ("rank", "itm"):
            raise ValueError(f"distill.head={self.head!r}: expected 'rank' or 'itm'")

    @classmethod
    def from_config(cls, section) -> "DistillConfig":
        return common.from_section(cls, section)


def _teacher_scores(setup: common.TaskSetup, params, captions, images):
    out = common.cross_outputs(setup.frozen["teacher"], params["teacher"], captions, images,
                               jax.random.key(0), True)
    if setup.config("distill", DistillConfig).head == "itm":
        return out.itm_logits[:, 1] - out.itm_logits[:, 0]
    return out.rank_score


def _teacher_inputs(setup: common.TaskSetup, params, batch) -> dict:
    """{"text", "image"}: the batch's inputs as the teacher reads them. A patch re-ranker's
    ViT runs once per batch image here, so the candidate pairs gather its tokens rather than
    encode the same pictures again for every candidate and direction."""
    image = batch["image"]
    if "pixels" in image:
        image = setup.frozen["teacher"].apply({"params": params["teacher"]}, image,
                                              method=CrossEncoder.patch_regions)
    return {"text": batch["text"], "image": image}


def _direction_loss(setup: common.TaskSetup, params, batch, teacher_inputs, direction: str,
                    queries, keys, key, scale):
    """f32[]: the KL term of one direction ("t2i": captions over images, "i2t": images over
    captions), averaged over the valid queries; teacher_inputs: `_teacher_inputs`."""
    cfg = setup.config("distill", DistillConfig)
    group, valid = batch["image_index"], batch["valid"]
    rows = hard_negatives.row_ids(setup.mesh, group.shape[0])
    drawn, found = hard_negatives.draw(setup.mesh, queries, keys, group, valid, key,
                                       cfg.sample_temperature, cfg.candidates - 1)
    candidates = jnp.concatenate([rows[:, None], drawn], axis=1)  # [B, K]: positive first
    mask = jnp.concatenate([valid[:, None], found], axis=1)
    # The student's scores are the CMR loss's: (normalized) dot products × scale.
    q, k = ((numerics.l2_normalize(x) for x in (queries, keys))
            if setup.config("loss", LossConfig).contrastive.normalize else (queries, keys))
    student = scale * hard_negatives.candidate_scores(setup.mesh, q, k, candidates)
    teacher = []
    for j in range(cfg.candidates):
        if direction == "t2i":
            captions = teacher_inputs["text"]
            images = common.take(setup, teacher_inputs, "image", candidates[:, j])
        else:
            captions = common.take(setup, teacher_inputs, "text", candidates[:, j])
            images = teacher_inputs["image"]
        teacher.append(_teacher_scores(setup, params, captions, images))
    teacher = jnp.stack(teacher, axis=1)
    if cfg.residual:
        teacher = teacher + jax.lax.stop_gradient(student)
    per_row = losses.distillation_loss_per_row(student, teacher, mask, cfg.temperature)
    return losses.weighted_mean(per_row, valid)


def loss(params, batch, rng, setup: common.TaskSetup):
    """CMR + weight · KL distillation from the frozen cross-encoder, both directions: each
    caption over its image and K − 1 drawn images, each image over its caption and K − 1 drawn
    captions. The student scores are the towers' dot products (the CMR loss's scores)."""
    if "teacher" not in setup.frozen or "teacher" not in params:
        raise ValueError("task 'distill' needs a teacher cross-encoder (distill.teacher: a "
                         f"{TEACHER_KIND} model directory)")
    dropout_key, sample_key = jax.random.split(rng)
    text, image = common.embed_pair(setup.model, params["model"], batch, dropout_key)
    value, metrics = cmr.loss_of_embeddings(params, batch, setup, text, image)
    scale, _ = common.scale_bias(setup, params)
    teacher_inputs = _teacher_inputs(setup, params, batch)
    kd = []
    for direction, (queries, keys), key in zip(
            ("t2i", "i2t"), ((text, image), (image, text)), jax.random.split(sample_key)):
        kd.append(_direction_loss(setup, params, batch, teacher_inputs, direction, queries,
                                  keys, key, scale))
        metrics[f"distill_{direction}"] = kd[-1]
    kd_loss = 0.5 * (kd[0] + kd[1])
    metrics["distill_loss"] = kd_loss
    return value + setup.config("distill", DistillConfig).weight * kd_loss, metrics


TASK = common.Task(
    "distill", loss, sections={"loss": LossConfig, "distill": DistillConfig},
    frozen=(common.FrozenModel("teacher", "distill.teacher",
                               accepts=lambda kind: kind == TEACHER_KIND,
                               expected=f"kind {TEACHER_KIND!r}", required=True),))
