"""What every training task shares: the Task declaration, the TaskSetup it runs with, the CMR
loss settings (cmr and distill both score with them) and the helpers of several tasks.

A task is a pure function
    loss, metrics = task.loss(params, batch, rng, setup)
where `params` = {"model": the Flax params, ["contrastive": {"log_scale", "bias"}], [frozen
models' params by name]}, `batch` a global batch [B@data, ...] (pipeline layout, see
data/pipeline.py), `rng` the dropout key and `setup` a `TaskSetup`. Losses are averaged over
the global batch (all masked tokens / regions of all devices), so a run gives the same numbers
on any number of devices and processes; within a batch they average as the original does.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from ldot_jax.models.pretraining import DualEncoderForPretraining
from ldot_jax.training import contrastive, hard_negatives


def from_section(cls, section: Mapping[str, Any] | None):
    """The dataclass `cls` from a config section: its fields that the section sets (other
    keys of the section belong to someone else, e.g. itm.dual to the frozen models)."""
    section = section or {}
    return cls(**{f.name: section[f.name] for f in dataclasses.fields(cls) if f.name in section})


@dataclasses.dataclass(frozen=True)
class FrozenModel:
    """A model a task uses without training it; its params arrive in params[name].

    name: its key in params and in TaskSetup.frozen; key: "section.field", the config key
    naming its model directory; accepts: model kind → whether it fits; expected: what fits, in
    words (for errors); required: a missing key is an error, else `missing` is logged (what
    the task does without it)."""

    name: str
    key: str
    accepts: Callable[[str], bool]
    expected: str
    required: bool = True
    missing: str = ""


@dataclasses.dataclass(frozen=True)
class Task:
    """A training task's declaration (one per module of this package).

    name: what `config.tasks` names; loss: (params, batch, rng, setup) → (loss f32[],
    {metric: f32[]}); sections: config section → the dataclass parsed from it (its
    `from_config(section)` builds it; TaskSetup.config finds it); frozen: the frozen models
    it needs; pipeline: the PipelineConfig flags it needs set (e.g. "mask_text")."""

    name: str
    loss: Callable[..., tuple[jax.Array, dict]]
    sections: Mapping[str, type] = dataclasses.field(default_factory=dict)
    frozen: tuple[FrozenModel, ...] = ()
    pipeline: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: hashed by identity (a jit static)
class TaskSetup:
    """What every task needs besides params, batch and rng.

    model: the trained Flax module (DualEncoder, DualEncoderForPretraining or CrossEncoder);
    mesh: None for one device; configs: config section → its parsed dataclass (see
    `config`); frozen: name → the frozen Flax modules (their params are params[name])."""

    model: Any
    mesh: jax.sharding.Mesh | None
    configs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    frozen: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def config(self, section: str, cls: type):
        """The parsed config of `section`; cls() (its defaults) when the setup has none."""
        value = self.configs.get(section)
        return cls() if value is None else value

    def init_params(self, model_config=None) -> dict:
        """The tasks' own trainable parameters ({"contrastive": …} with a learned
        temperature, {"words": …} with loss.words_weight): what every section's config
        contributes with `init_params(model_config)` (default: the model's config)."""
        model_config = model_config or getattr(self.model, "config", None)
        out = {}
        for value in self.configs.values():
            if hasattr(value, "init_params"):
                out.update(value.init_params(model_config))
        return out


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """The CMR loss: `contrastive` options, the temperature and Matryoshka prefixes (section
    `loss`; used by cmr and by distill's CMR term).

    temperature: None → raw dot products (the original); a float → fixed 1 / temperature scale;
    learn_temperature: the scale is a parameter (params["contrastive"]["log_scale"]),
      initialized at 1 / temperature.
    matryoshka_dims / weights: the loss also on these embedding prefixes (HiVLP), each weighted;
      the full dimension is always included with weight 1 unless listed.
    sigmoid_bias: initial bias of the sigmoid loss (learned with the temperature).
    words_weight: > 0 adds caption-word prediction from the image vector, this weighted
      (`losses.words_loss`: a linear head, params["words"], says which vocabulary ids the paired
      caption holds; a bag-of-words form of VirTex / CapPa's captioning signal, no decoder).
    """

    contrastive: contrastive.ContrastiveConfig = contrastive.ContrastiveConfig()
    temperature: float | None = None
    learn_temperature: bool = False
    matryoshka_dims: tuple[int, ...] = ()
    matryoshka_weights: tuple[float, ...] = ()
    sigmoid_bias: float = -10.0
    words_weight: float = 0.0

    def __post_init__(self):
        if not (np.isfinite(self.words_weight) and self.words_weight >= 0):
            raise ValueError(f"loss.words_weight={self.words_weight}: expected a finite "
                             f"number >= 0")
        if self.learn_temperature and self.temperature is None:
            raise ValueError("loss.learn_temperature needs loss.temperature (its initial value)")
        if self.temperature is not None and self.temperature <= 0:
            raise ValueError(f"loss.temperature={self.temperature}: expected > 0")
        if self.matryoshka_weights and len(self.matryoshka_weights) != len(
                self.matryoshka_dims):
            raise ValueError(f"loss.matryoshka_weights {self.matryoshka_weights} do not match "
                             f"matryoshka_dims {self.matryoshka_dims}")

    @classmethod
    def from_config(cls, c) -> "LossConfig":
        """From the `loss` section of a run config."""
        c = c or {}
        return cls(
            contrastive=contrastive.ContrastiveConfig(**{
                k: c[k] for k in ("kind", "negatives", "same_image_positives", "normalize",
                                  "chunk_size") if k in c}),
            temperature=c.get("temperature"), learn_temperature=c.get("learn_temperature", False),
            matryoshka_dims=tuple(c.get("matryoshka_dims", ()) or ()),
            matryoshka_weights=tuple(c.get("matryoshka_weights", ()) or ()),
            words_weight=float(c.get("words_weight", 0.0)))

    def init_params(self, model_config=None) -> dict:
        """The loss's own trainable parameters: {"contrastive": {"log_scale"[, "bias"]}} when
        the temperature is learned, {"words": {"kernel" f32[P, V], "bias" f32[V]}} with
        words_weight (P, V: model_config's project_dim and text vocabulary)."""
        out = {}
        if self.learn_temperature:
            learned = {"log_scale": jnp.asarray(np.log(1.0 / self.temperature), jnp.float32)}
            if self.contrastive.kind == "sigmoid":
                learned["bias"] = jnp.asarray(self.sigmoid_bias, jnp.float32)
            out["contrastive"] = learned
        if self.words_weight:
            if model_config is None:
                raise ValueError("loss.words_weight: the words head is sized by the model's "
                                 "config (project_dim, text.vocab_size); none was given")
            dim, vocab = model_config.project_dim, model_config.text.vocab_size
            # A zero kernel: the head starts as the prior (each id in 1 of V captions), so the
            # first steps' image gradients are the contrastive loss's alone.
            out["words"] = {"kernel": jnp.zeros((dim, vocab), jnp.float32),
                            "bias": jnp.full((vocab,), -np.log(vocab), jnp.float32)}
        return out

    def prefixes(self, full_dim: int) -> dict[int, float]:
        """{embedding prefix size: its weight}: the full size first (weight 1 unless listed),
        then the Matryoshka prefixes as listed."""
        weights = dict(zip(self.matryoshka_dims,
                           self.matryoshka_weights or (1.0,) * len(self.matryoshka_dims)))
        return {full_dim: weights.pop(full_dim, 1.0), **weights}


def scale_bias(setup: TaskSetup, params):
    """(scale, bias) of the CMR scores: the learned ones in params["contrastive"], or the
    fixed ones of the `loss` section."""
    cfg = setup.config("loss", LossConfig)
    if cfg.learn_temperature:
        p = params["contrastive"]
        return jnp.exp(p["log_scale"]), p.get("bias", 0.0)
    scale = 1.0 if cfg.temperature is None else 1.0 / cfg.temperature
    bias = cfg.sigmoid_bias if cfg.contrastive.kind == "sigmoid" else 0.0
    return scale, bias


def embed_pair(model, model_params, batch, rng, deterministic: bool = False):
    """(text f32[B, P], image f32[B, P]) retrieval vectors of a batch's captions and images by
    `model`, a dual encoder (or the pre-training model holding one)."""
    def both(module):
        dual = module.dual_encoder if isinstance(module, DualEncoderForPretraining) else module
        return (dual.encode_text(batch["text"], deterministic),
                dual.encode_image(batch["image"], deterministic))
    return model.apply({"params": model_params}, method=both, rngs={"dropout": rng})


def take(setup: TaskSetup, batch, side: str, index):
    """The `side` ("text" / "image") input pytree of the batch at global rows index i32[B]
    (gathered across devices)."""
    return jax.tree.map(lambda x: hard_negatives.gather(setup.mesh, x, index[:, None])[:, 0],
                        batch[side])


def cross_outputs(model, params, text, image, rng, deterministic):
    """The cross-encoder's outputs (itm_logits, rank_score) for B (caption, image) pairs
    (text / image input pytrees)."""
    return model.apply({"params": params}, text, image, deterministic=deterministic,
                       rngs={"dropout": rng})


def pretraining_model(setup: TaskSetup, task: str) -> DualEncoderForPretraining:
    if not isinstance(setup.model, DualEncoderForPretraining):
        raise ValueError(f"task {task!r} needs the pre-training model (model kind "
                         f"'lightningdot_pretrain'), got {type(setup.model).__name__}")
    return setup.model


def masked_regions(batch):
    return batch["region_masked"] & batch["valid"][:, None]
