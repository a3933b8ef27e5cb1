"""Task itm, the cross-encoder (re-ranker): each caption with its image, with k hard negative
images and each image with k hard negative captions, drawn from a frozen dual encoder's scores
over the global batch (hard_negatives.py); UNITER's 2-way ITM cross-entropy and rank hinge,
and a listwise softmax. Section `itm` (ItmConfig); frozen model "dual" from `itm.dual`
(optional: without it negatives are drawn uniformly)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from ldot_jax.checkpoints import kinds
from ldot_jax.core import numerics
from ldot_jax.models.cross_encoder import CrossEncoder
from ldot_jax.training import hard_negatives, losses
from ldot_jax.training.tasks import common


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

    @classmethod
    def from_config(cls, section) -> "ItmConfig":
        return common.from_section(cls, section)


def _dual_vectors(setup: common.TaskSetup, params, batch, rng, cfg: ItmConfig):
    """(text, image, sampling temperature): the frozen dual encoder's vectors that the
    negatives are drawn by, or (without one) zeros and uniform draws."""
    dual = setup.frozen.get("dual")
    if dual is not None:
        text, image = jax.lax.stop_gradient(common.embed_pair(dual, params["dual"], batch, rng,
                                                              deterministic=True))
        if cfg.normalize:
            text, image = numerics.l2_normalize(text), numerics.l2_normalize(image)
        return text, image, cfg.sample_temperature
    if cfg.residual_scale is not None:
        raise ValueError("itm.residual_scale needs the dual encoder's scores (itm.dual)")
    zeros = jnp.zeros((batch["image_index"].shape[0], 1), jnp.float32)
    return zeros, zeros, None  # uniform among other images' rows


def _listwise(setup, cfg: ItmConfig, text, image, positive, negatives, valid):
    """The listwise loss of both directions; negatives: {"image": (index, found, rank scores
    [B, k]), "text": (…)}. With residual_scale, each pair's score adds the dual's."""
    terms = []
    for side, (queries, keys) in (("image", (text, image)), ("text", (image, text))):
        index, found, scores = negatives[side]
        list_positive = positive
        if cfg.residual_scale is not None:  # + the dual's own score of each pair
            list_positive = positive + cfg.residual_scale * jnp.sum(text * image, axis=-1)
            scores = scores + cfg.residual_scale * hard_negatives.candidate_scores(
                setup.mesh, queries, keys, index)
        terms.append(losses.listwise_rank_loss(list_positive, scores, found, valid))
    return 0.5 * (terms[0] + terms[1])


def loss(params, batch, rng, setup: common.TaskSetup):
    """The re-ranker's loss over B positives, B·k hard negative images (k per caption) and B·k
    hard negative captions (k per image), all drawn from the global batch.

    The ITM cross-entropy weighs each negative 1 / k, so positives keep a third of its weight
    whatever k; the rank hinge and the listwise loss average both directions."""
    if not isinstance(setup.model, CrossEncoder):
        raise ValueError(f"task 'itm' trains the cross-encoder (model kind 'uniter_itm'), got "
                         f"{type(setup.model).__name__}")
    cfg = setup.config("itm", ItmConfig)
    k = cfg.negatives
    sample_key, positive_key, *dropout = jax.random.split(rng, 2 + 2 * k)
    group, valid = batch["image_index"], batch["valid"]
    text, image, temperature = _dual_vectors(setup, params, batch, rng, cfg)
    text_key, image_key = jax.random.split(sample_key)
    neg_image, image_found = hard_negatives.draw(setup.mesh, text, image, group, valid,
                                                 text_key, temperature, k)
    neg_text, text_found = hard_negatives.draw(setup.mesh, image, text, group, valid,
                                               image_key, temperature, k)
    captions, images = batch["text"], batch["image"]
    model, weights = setup.model, params["model"]
    if "pixels" in images:
        # The patch re-ranker: its ViT runs once per image (trained with the rest); the
        # negative pairs gather these tokens rather than encode the pictures again.
        images = model.apply({"params": weights}, images, method=CrossEncoder.patch_regions)
    sides = {"text": captions, "image": images}
    positive = common.cross_outputs(model, weights, captions, images, positive_key, False)
    # One fixed-shape pass of B pairs per negative slot (k is small; a Python loop keeps
    # every pass sharded B@data like the batch).
    with_neg_image = [common.cross_outputs(
        model, weights, captions, common.take(setup, sides, "image", neg_image[:, j]),
        dropout[j], False) for j in range(k)]
    with_neg_text = [common.cross_outputs(
        model, weights, common.take(setup, sides, "text", neg_text[:, j]), images,
        dropout[k + j], False) for j in range(k)]
    logits = jnp.concatenate([positive.itm_logits]
                             + [o.itm_logits for o in with_neg_image + with_neg_text])
    labels = jnp.concatenate([jnp.ones_like(group)] + [jnp.zeros_like(group)] * (2 * k))
    found = jnp.concatenate([valid] + [image_found[:, j] for j in range(k)]
                            + [text_found[:, j] for j in range(k)])
    ones = jnp.ones_like(group, jnp.float32)  # sharded like the batch
    pair_weights = found.astype(jnp.float32) * jnp.concatenate([ones] + [ones / k] * (2 * k))
    itm_loss = losses.itm_loss(logits, labels, pair_weights)
    neg_image_scores = jnp.stack([o.rank_score for o in with_neg_image], axis=1)  # [B, k]
    neg_text_scores = jnp.stack([o.rank_score for o in with_neg_text], axis=1)
    rank = 0.5 * (losses.rank_hinge_loss(positive.rank_score, neg_image_scores, image_found,
                                         cfg.margin)
                  + losses.rank_hinge_loss(positive.rank_score, neg_text_scores, text_found,
                                           cfg.margin))
    listwise = _listwise(setup, cfg, text, image, positive.rank_score,
                         {"image": (neg_image, image_found, neg_image_scores),
                          "text": (neg_text, text_found, neg_text_scores)}, valid)
    correct = (jnp.argmax(logits, -1) == labels) & found
    metrics = {"itm_loss": itm_loss, "rank_loss": rank, "list_loss": listwise,
               "itm_accuracy": jnp.sum(correct) / jnp.maximum(jnp.sum(found), 1)}
    total = cfg.itm_weight * itm_loss + cfg.rank_weight * rank + cfg.list_weight * listwise
    return total, metrics


TASK = common.Task(
    "itm", loss, sections={"itm": ItmConfig},
    frozen=(common.FrozenModel(
        "dual", "itm.dual", accepts=lambda kind: kinds.get(kind).is_dual_encoder,
        expected="a dual encoder (" + " or ".join(kinds.dual_encoder_kinds()) + ")",
        required=False, missing="negatives are drawn uniformly, not hard"),))
