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
# The MLP activations (models/layers.activation): BERT's exact GELU, OpenAI CLIP's QuickGELU
# x·σ(1.702x), and the tanh approximation big_vision's ViTs use.
ACTIVATIONS = ("gelu", "quick_gelu", "gelu_tanh")
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
    """The sizes and numerics of one transformer: a BERT-style post-LN trunk (text embeddings +
    encoder), or the pre-LN trunk of a ViT / CLIP tower (models/prenorm.py), which reads the
    sizes, `layer_norm_eps` and `activation` and ignores `type_vocab_size` (and the ViT
    `vocab_size` and `max_position_embeddings`: its positions are the patches).

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
    activation: str = "gelu"

    def __post_init__(self):
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation={self.activation!r}: expected one of {ACTIVATIONS}")
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


# The image vector's source: the class token, the patch tokens' mean, their max per feature
# (a pattern present anywhere, not averaged away with the background), or big_vision's
# multihead attention pooling (a learned probe attends over the patch tokens).
POOLS = ("tok", "avg", "max", "map")
# How pixels become patch tokens: open_clip's linear p × p patch embedding, a convolutional
# stem (Xiao et al. 2021) of log2(p) 3 × 3 stride-2 convolutions, then a 1 × 1 projection, or
# a small CNN max-pooled over each patch's cell (models/vit.CnnStem).
STEMS = ("patch", "conv", "cnn")
# OpenAI CLIP's normalization of RGB values in [0, 1] (open_clip's OPENAI_DATASET_MEAN / STD).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _positive_ints(values) -> bool:
    return all(isinstance(n, int) and n > 0 for n in values)


def _floats(config, key: str, count: int) -> None:
    """Coerces a field holding `count` numbers to a tuple of floats (JSON gives lists)."""
    value = getattr(config, key)
    try:
        value = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{type(config).__name__}.{key}={value!r}: expected {count} "
                         f"numbers") from None
    if len(value) != count:
        raise ValueError(f"{type(config).__name__}.{key}={value!r}: expected {count} numbers")
    object.__setattr__(config, key, value)


@dataclasses.dataclass(frozen=True)
class PixelConfig:
    """The pixels a ViT image tower reads: square images of `image_size` cut into patches.

    The tower's input is uint8 RGB [B, image_size, image_size, 3] (resized and center-cropped
    as data/images.py does); it normalizes them itself, (x / 255 - mean) / std per channel, so
    what is stored and sent to the devices stays uint8. pool: the image vector's source, the
    class token ("tok") or the mean of the patch tokens ("avg"), as open_clip's pool_type, their
    max per feature ("max"), or attention pooling ("map", big_vision's MAPHead). stem: "patch"
    (open_clip's, the only one its checkpoints have), "conv" (the patch size a power of 2) or
    "cnn" (the patch size a multiple of 4); stem_channels: the conv stem's channels per
    stride-2 convolution, log2(patch_size) of them (empty: width / 2^k, doubling up to the
    width), or the cnn stem's per 3 × 3 convolution, at least 2 (the first two of stride 2;
    empty: width / 8, width / 4, width / 4, at least 8 each).
    """

    image_size: int = 224
    patch_size: int = 32
    pool: str = "tok"
    stem: str = "patch"
    stem_channels: tuple = ()
    mean: tuple = CLIP_MEAN
    std: tuple = CLIP_STD

    def __post_init__(self):
        _check_positive(self, ("image_size", "patch_size"))
        if self.image_size % self.patch_size:
            raise ValueError(f"PixelConfig: image_size={self.image_size} is not a multiple of "
                             f"patch_size={self.patch_size}")
        if self.pool not in POOLS:
            raise ValueError(f"PixelConfig.pool={self.pool!r}: expected one of {POOLS}")
        if self.stem not in STEMS:
            raise ValueError(f"PixelConfig.stem={self.stem!r}: expected one of {STEMS}")
        object.__setattr__(self, "stem_channels", tuple(self.stem_channels))
        if self.stem == "conv":
            p = self.patch_size
            if p & (p - 1):
                raise ValueError(f"PixelConfig.patch_size={p}: the conv stem halves the image "
                                 f"per convolution, so the patch size must be a power of 2")
            if self.stem_channels and (len(self.stem_channels) != self.conv_layers
                                       or not _positive_ints(self.stem_channels)):
                raise ValueError(f"PixelConfig.stem_channels={self.stem_channels}: expected "
                                 f"{self.conv_layers} positive ints (log2(patch_size="
                                 f"{p})), or none for the default")
        elif self.stem == "cnn":
            if self.patch_size % 4:
                raise ValueError(f"PixelConfig.patch_size={self.patch_size}: the cnn stem "
                                 f"works at a quarter of the image side and max-pools each "
                                 f"patch's cell there, so the patch size must be a multiple "
                                 f"of 4")
            if self.stem_channels and (len(self.stem_channels) < 2
                                       or not _positive_ints(self.stem_channels)):
                raise ValueError(f"PixelConfig.stem_channels={self.stem_channels}: the cnn "
                                 f"stem expects at least 2 positive ints (one per 3 × 3 "
                                 f"convolution), or none for the default")
        elif self.stem_channels:
            raise ValueError(f"PixelConfig.stem_channels={self.stem_channels}: only the conv "
                             f"and cnn stems have channels (stem={self.stem!r})")
        _floats(self, "mean", 3)
        _floats(self, "std", 3)
        if min(self.std) <= 0:
            raise ValueError(f"PixelConfig.std={self.std}: expected positive values")

    @property
    def grid(self) -> int:
        """Patches per side."""
        return self.image_size // self.patch_size

    @property
    def conv_layers(self) -> int:
        """The conv stem's stride-2 convolutions: log2(patch_size)."""
        return self.patch_size.bit_length() - 1


# Image towers whose input starts with a text token (`cls_token_id`, from their own table).
TOKEN_READING_IMAGE_TOWERS = ("uniter_regions",)


@dataclasses.dataclass(frozen=True)
class DualEncoderConfig:
    """LightningDOT bi-encoder: a BERT text tower and a UNITER image tower, no shared weights;
    or any pair of towers from models/towers.py's registries (TEXT_TOWERS, IMAGE_TOWERS), named
    by `text_tower` / `image_tower`: "clip" text and "vit" pixels (open_clip's CLIP) or mixed.

    `cls_token_id` is the single text token the region tower sees at position 0. `pixels`: the
    ViT tower's images (unused by the region tower; `region`: unused by the ViT).
    `normalize_embeddings`: the towers' retrieval vectors are L2-normalized (CLIP's cosine;
    LightningDOT: raw). `logit_scale`: None, or the initial log of the scale of CLIP's logits
    (exp(logit_scale) · cosine), then a parameter of the model ("logit_scale").
    """

    text: TransformerConfig = TransformerConfig()
    image: TransformerConfig = TransformerConfig()
    region: RegionConfig = RegionConfig()
    project_dim: int = 768
    cls_token_id: int = 101
    text_tower: str = "bert"
    image_tower: str = "uniter_regions"
    pixels: PixelConfig = PixelConfig()
    normalize_embeddings: bool = False
    logit_scale: float | None = None

    @property
    def image_reads_tokens(self) -> bool:
        """Whether the image tower embeds a text token (the region tower's [CLS])."""
        return self.image_tower in TOKEN_READING_IMAGE_TOWERS

    def __post_init__(self):
        _check_positive(self, ("project_dim",))
        if self.image_reads_tokens and not 0 <= self.cls_token_id < self.image.vocab_size:
            raise ValueError(f"cls_token_id={self.cls_token_id} is outside the image tower's "
                             f"vocabulary of {self.image.vocab_size}")


@dataclasses.dataclass(frozen=True)
class CrossEncoderConfig:
    """UNITER ITM cross-encoder: one single-stream transformer over text tokens and regions.

    image_tower None: the regions are detector regions (the image input "regions"); "vit":
    the re-ranker reads pixels through its own ViT (`image`, `pixels`), whose class and patch
    tokens [B, 1 + g², W] are its regions (boxes: the whole image, then the patch cells;
    region.feat_dim must be the ViT's width W) — the patch re-ranker.
    """

    transformer: TransformerConfig = TransformerConfig()
    region: RegionConfig = RegionConfig()
    image_tower: str | None = None
    image: TransformerConfig = TransformerConfig()
    pixels: PixelConfig = PixelConfig()

    def __post_init__(self):
        if self.image_tower not in (None, "vit"):
            raise ValueError(f"CrossEncoderConfig.image_tower={self.image_tower!r}: expected "
                             f"None (detector regions) or 'vit' (patches)")
        if self.image_tower == "vit" and (self.region.feat_dim, self.region.box_dim) != (
                self.image.hidden_size, 7):
            raise ValueError(f"a patch re-ranker's regions are its ViT's tokens: "
                             f"region.feat_dim={self.region.feat_dim} and box_dim="
                             f"{self.region.box_dim} must be image.hidden_size="
                             f"{self.image.hidden_size} and 7")


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
    sides = (("transformer",) if hasattr(model_config, "transformer") else
             ("text", "image") if getattr(model_config, "image_reads_tokens", True) else
             ("text",))
    check_cls = check_cls and getattr(model_config, "image_reads_tokens", True)
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
               and not isinstance(getattr(config, f.name), (RegionConfig, PixelConfig))}
    return dataclasses.replace(config, **updates)


def base_dual_encoder_config() -> DualEncoderConfig:
    """The released LightningDOT bi-encoder: bert-base-cased + UNITER-base, project dim 768."""
    return DualEncoderConfig()


def base_cross_encoder_config() -> CrossEncoderConfig:
    """UNITER-base ITM."""
    return CrossEncoderConfig()
