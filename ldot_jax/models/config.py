"""Model configurations: sizes and numerics of the towers and the cross-encoder.

The configs are frozen dataclasses (hashable, so Flax modules can hold them) that round-trip
through plain dicts / JSON. Experiment configs (ml_collections) refer to them by preset name or
carry a dict that `from_dict` validates.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax.numpy as jnp

ATTENTION_IMPLS = ("xla", "fused")
# TransformerConfig fields that change how a model computes, not what it is (sizes, param dtype).
NUMERICS = ("dtype", "attention_impl", "remat", "hidden_dropout", "attention_dropout")
DTYPES = ("float32", "bfloat16", "float16")


def _check_positive(config, keys):
    for key in keys:
        value = getattr(config, key)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{type(config).__name__}.{key}={value!r}: expected a positive int")


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """A BERT-style post-LN transformer (text embeddings + encoder).

    `dtype` is the compute dtype; parameters are always stored in `param_dtype` (float32 by
    default). `attention_impl` "xla" is the explicit softmax(QK^T/sqrt(d) + bias)V of the
    original (supports attention dropout); "fused" calls `jax.nn.dot_product_attention` with
    the implementation JAX picks (XLA in jax 0.10), which has no attention-probability dropout:
    training with it requires attention_dropout = 0.
    """

    vocab_size: int = 28996
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    initializer_range: float = 0.02
    attention_impl: str = "xla"
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: bool = False

    def __post_init__(self):
        _check_positive(self, ("vocab_size", "hidden_size", "num_layers", "num_heads",
                               "intermediate_size", "max_position_embeddings",
                               "type_vocab_size"))
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(
                f"attention_impl={self.attention_impl!r}: expected one of {ATTENTION_IMPLS}")
        for key in ("dtype", "param_dtype"):
            if getattr(self, key) not in DTYPES:
                raise ValueError(f"{key}={getattr(self, key)!r}: expected one of {DTYPES}")
        for key in ("hidden_dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ValueError(f"{key}={getattr(self, key)}: expected a rate in [0, 1)")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def params_dtype(self):
        return jnp.dtype(self.param_dtype)


@dataclasses.dataclass(frozen=True)
class RegionConfig:
    """Detector regions fed to a UNITER trunk: feature dim, box dim, detector classes."""

    feat_dim: int = 2048
    box_dim: int = 7
    num_classes: int = 1601

    def __post_init__(self):
        _check_positive(self, ("feat_dim", "box_dim", "num_classes"))


@dataclasses.dataclass(frozen=True)
class DualEncoderConfig:
    """LightningDOT bi-encoder: a BERT text tower and a UNITER image tower, no shared weights.

    `cls_token_id` is the single text token the image tower sees at position 0. `text_tower` /
    `image_tower` name the towers in models/towers.py's registries (TEXT_TOWERS, IMAGE_TOWERS).
    """

    text: TransformerConfig = TransformerConfig()
    image: TransformerConfig = TransformerConfig()
    region: RegionConfig = RegionConfig()
    project_dim: int = 768
    cls_token_id: int = 101
    text_tower: str = "bert"
    image_tower: str = "uniter_regions"

    def __post_init__(self):
        _check_positive(self, ("project_dim",))
        if not 0 <= self.cls_token_id < self.image.vocab_size:
            raise ValueError(f"cls_token_id={self.cls_token_id} is outside the image tower's "
                             f"vocabulary of {self.image.vocab_size}")


@dataclasses.dataclass(frozen=True)
class CrossEncoderConfig:
    """UNITER ITM cross-encoder: one single-stream transformer over text tokens and regions."""

    transformer: TransformerConfig = TransformerConfig()
    region: RegionConfig = RegionConfig()


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """A plain BERT trunk (embeddings + encoder), as converted from a BERT checkpoint."""

    transformer: TransformerConfig = TransformerConfig()


ModelConfig = DualEncoderConfig | CrossEncoderConfig | BertConfig


def check_vocabulary(tokenizer, model_config, check_cls: bool = True) -> None:
    """ValueError if a tokenizer's ids do not fit the model: its vocabulary larger than a
    side's `vocab_size` (ids past the table would be NaN rows), or (check_cls) another [CLS]
    id than the image tower's. `tokenizer`: anything with vocab_size / cls_id (None: nothing
    to check)."""
    if tokenizer is None:
        return
    vocab = getattr(tokenizer, "vocab_size", None)
    sides = ("transformer",) if hasattr(model_config, "transformer") else ("text", "image")
    for side in sides:
        size = getattr(model_config, side).vocab_size
        if vocab is not None and vocab > size:
            raise ValueError(f"the tokenizer has {vocab} tokens but model.{side}.vocab_size="
                             f"{size}: ids ≥ {size} have no embedding (another tokenizer?)")
    cls_id = getattr(tokenizer, "cls_id", None)
    if check_cls and cls_id is not None and getattr(model_config, "cls_token_id", cls_id) != cls_id:
        raise ValueError(f"model.cls_token_id={model_config.cls_token_id} but the tokenizer's "
                         f"[CLS] is {cls_id}")


def to_dict(config) -> dict[str, Any]:
    """Nested plain dict of a config (JSON-serializable)."""
    return dataclasses.asdict(config)


def from_dict(cls, values: Mapping[str, Any], where: str = "config"):
    """Builds `cls` from a (nested) dict; unknown keys are an error naming them.

    Missing keys take their defaults. `where` prefixes key names in error messages.
    """
    if not isinstance(values, Mapping):
        raise ValueError(f"{where}: expected a mapping for {cls.__name__}, got "
                         f"{type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown} for {cls.__name__}; "
                         f"valid keys are {sorted(fields)}")
    kwargs = {}
    for name, value in values.items():
        default = fields[name].default
        if dataclasses.is_dataclass(default):
            kwargs[name] = from_dict(type(default), value, f"{where}.{name}")
        else:
            kwargs[name] = value
    return cls(**kwargs)


def replace_numerics(config, **changes):
    """Returns `config` with numerics (the fields in NUMERICS) changed in every
    TransformerConfig it contains, e.g. `replace_numerics(cfg, dtype="bfloat16")`."""
    unknown = sorted(set(changes) - set(NUMERICS))
    if unknown:
        raise ValueError(f"{unknown} cannot be overridden at load time; the numerics that can "
                         f"are {list(NUMERICS)}")
    if isinstance(config, TransformerConfig):
        return dataclasses.replace(config, **changes)
    updates = {f.name: replace_numerics(getattr(config, f.name), **changes)
               for f in dataclasses.fields(config)
               if dataclasses.is_dataclass(getattr(config, f.name))
               and not isinstance(getattr(config, f.name), RegionConfig)}
    return dataclasses.replace(config, **updates)


def base_dual_encoder_config() -> DualEncoderConfig:
    """The released LightningDOT bi-encoder: bert-base-cased + UNITER-base, project dim 768."""
    return DualEncoderConfig()


def base_cross_encoder_config() -> CrossEncoderConfig:
    """UNITER-base ITM."""
    return CrossEncoderConfig()
