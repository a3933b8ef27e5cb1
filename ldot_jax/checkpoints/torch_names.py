"""PyTorch parameter names ⇄ Flax paths, and model sizes from tensor shapes, for the
checkpoint kinds of the original code (LightningDOT, UNITER, BERT) and of open_clip's CLIP.

Names are translated by `Rule`s that work both ways, so the same tables also export Flax params
back to a PyTorch-named state_dict. Each kind's rules (`*_rules`), trunk prefix
(`*_trunk_prefix`) and config inference (`infer_*`) are registered in checkpoints/kinds.py.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Iterable, Mapping

import numpy as np

from ldot_jax.models.config import (BertConfig, CrossEncoderConfig, DualEncoderConfig,
                                    PixelConfig, RegionConfig, TransformerConfig)

DENSE, LAYER_NORM, EMBED, TENSOR = "dense", "layer_norm", "embed", "tensor"
# Per module kind: PyTorch parameter name → Flax leaf name.
_LEAVES = {
    DENSE: {"weight": "kernel", "bias": "bias"},
    LAYER_NORM: {"weight": "scale", "bias": "bias"},
    EMBED: {"weight": "embedding"},
}
_PLACEHOLDERS = {"n": r"\d+", "proj": r"query|key|value"}


@dataclasses.dataclass(frozen=True)
class Rule:
    """Maps a PyTorch module (`torch`, dotted) to a Flax module (`flax`, slash-separated).

    Templates may hold {n} (layer index) and {proj} (query|key|value). For kind TENSOR both
    templates name a single tensor (a raw parameter), not a module; its `axes` (None: the
    same layout) is the permutation taking the PyTorch tensor to the Flax one (np.transpose),
    e.g. (1, 0) for a fused in_proj_weight [3W, W] → Dense kernel [W, 3W], (2, 3, 1, 0) for
    a conv weight [O, I, kh, kw] → [kh, kw, I, O].
    """

    torch: str
    flax: str
    kind: str
    axes: tuple[int, ...] | None = None

    def _regex(self, template: str, sep: str) -> re.Pattern:
        return _compile(template, sep, self.kind)

    def to_flax(self, key: str) -> tuple[str, Layout] | None:
        """PyTorch key → (Flax path, the layout change to apply) or None."""
        m = self._regex(self.torch, ".").match(key)
        if not m:
            return None
        groups = {k: v for k, v in m.groupdict().items() if k != "leaf"}
        path = self.flax.format(**groups)
        if self.kind == TENSOR:
            return path, Layout(self.axes)
        leaf = _LEAVES[self.kind][m.group("leaf")]
        return f"{path}/{leaf}", Layout((1, 0) if leaf == "kernel" else None)

    def to_torch(self, path: str) -> tuple[str, Layout] | None:
        """Flax path → (PyTorch key, the layout change from PyTorch to Flax) or None."""
        m = self._regex(self.flax, "/").match(path)
        if not m:
            return None
        groups = {k: v for k, v in m.groupdict().items() if k != "leaf"}
        key = self.torch.format(**groups)
        if self.kind == TENSOR:
            return key, Layout(self.axes)
        inverse = {v: k for k, v in _LEAVES[self.kind].items()}
        leaf = m.group("leaf")
        return f"{key}.{inverse[leaf]}", Layout((1, 0) if leaf == "kernel" else None)


@dataclasses.dataclass(frozen=True)
class Layout:
    """How a PyTorch tensor's axes map to its Flax parameter's: `axes` None (the same) or the
    permutation np.transpose applies (Linear weight [out, in] → kernel [in, out]: (1, 0))."""

    axes: tuple[int, ...] | None = None

    def to_flax(self, value):
        return value if self.axes is None else np.transpose(value, self.axes)

    def to_torch(self, value):
        return value if self.axes is None else np.transpose(value, np.argsort(self.axes))

    def torch_shape(self, flax_shape) -> tuple[int, ...]:
        """The PyTorch shape of a Flax parameter of `flax_shape`."""
        shape = tuple(flax_shape)
        return shape if self.axes is None else tuple(shape[i] for i in np.argsort(self.axes))


@functools.lru_cache(maxsize=None)
def _compile(template: str, sep: str, kind: str) -> re.Pattern:
    """Regex of a Rule template; leaf names follow `sep` ("." PyTorch, "/" Flax)."""
    pattern = re.escape(template)
    for name, sub in _PLACEHOLDERS.items():
        pattern = pattern.replace(re.escape("{" + name + "}"), f"(?P<{name}>{sub})")
    if kind != TENSOR:
        leaves = _LEAVES[kind].keys() if sep == "." else _LEAVES[kind].values()
        pattern += re.escape(sep) + "(?P<leaf>" + "|".join(leaves) + ")"
    return re.compile(pattern + r"\Z")


def _prefixed(rules: Iterable[Rule], torch_prefix: str, flax_prefix: str) -> list[Rule]:
    return [dataclasses.replace(r, torch=torch_prefix + r.torch, flax=flax_prefix + r.flax)
            for r in rules]


TEXT_EMBEDDINGS = [
    Rule("embeddings.word_embeddings", "embeddings/word_embeddings", EMBED),
    Rule("embeddings.position_embeddings", "embeddings/position_embeddings", EMBED),
    Rule("embeddings.token_type_embeddings", "embeddings/token_type_embeddings", EMBED),
    Rule("embeddings.LayerNorm", "embeddings/layer_norm", LAYER_NORM),
]
ENCODER = [
    Rule("encoder.layer.{n}.attention.self.{proj}", "encoder/layer_{n}/attention/{proj}", DENSE),
    Rule("encoder.layer.{n}.attention.output.dense", "encoder/layer_{n}/attention/output", DENSE),
    Rule("encoder.layer.{n}.attention.output.LayerNorm",
         "encoder/layer_{n}/attention_layer_norm", LAYER_NORM),
    Rule("encoder.layer.{n}.intermediate.dense", "encoder/layer_{n}/intermediate", DENSE),
    Rule("encoder.layer.{n}.output.dense", "encoder/layer_{n}/output", DENSE),
    Rule("encoder.layer.{n}.output.LayerNorm", "encoder/layer_{n}/output_layer_norm", LAYER_NORM),
]
REGION_EMBEDDINGS = [
    Rule("img_embeddings.img_linear", "region_embeddings/img_linear", DENSE),
    Rule("img_embeddings.img_layer_norm", "region_embeddings/img_layer_norm", LAYER_NORM),
    Rule("img_embeddings.pos_linear", "region_embeddings/pos_linear", DENSE),
    Rule("img_embeddings.pos_layer_norm", "region_embeddings/pos_layer_norm", LAYER_NORM),
    Rule("img_embeddings.mask_embedding.weight", "region_embeddings/mask_embedding", TENSOR),
    Rule("img_embeddings.LayerNorm", "region_embeddings/layer_norm", LAYER_NORM),
]
ENCODE_PROJ = [
    Rule("encode_proj.0", "encode_proj/dense_in", DENSE),
    Rule("encode_proj.2", "encode_proj/layer_norm", LAYER_NORM),
    Rule("encode_proj.3", "encode_proj/dense_out", DENSE),
]
BERT_TRUNK = TEXT_EMBEDDINGS + ENCODER
UNITER_TRUNK = TEXT_EMBEDDINGS + REGION_EMBEDDINGS + ENCODER
DUAL_ENCODER = (_prefixed(BERT_TRUNK, "txt_model.bert.", "text_tower/bert/")
                + _prefixed(ENCODE_PROJ, "txt_model.", "text_tower/")
                + _prefixed(UNITER_TRUNK, "img_model.bert.", "image_tower/uniter/")
                + _prefixed(ENCODE_PROJ, "img_model.", "image_tower/"))
PRETRAIN_HEADS = [
    Rule("cls.predictions.transform.dense", "mlm_head/transform", DENSE),
    Rule("cls.predictions.transform.LayerNorm", "mlm_head/layer_norm", LAYER_NORM),
    Rule("cls.predictions.bias", "mlm_head/bias", TENSOR),
    Rule("feat_regress.net.0", "mrfr_head/transform", DENSE),
    Rule("feat_regress.net.2", "mrfr_head/layer_norm", LAYER_NORM),
    Rule("feat_regress.bias", "mrfr_head/bias", TENSOR),
    Rule("region_classifier.net.0", "mrc_head/transform", DENSE),
    Rule("region_classifier.net.2", "mrc_head/layer_norm", LAYER_NORM),
    Rule("region_classifier.net.3", "mrc_head/classifier", DENSE),
]
ITM_HEADS = [
    Rule("pooler.dense", "pooler", DENSE),
    Rule("itm_output", "itm_output", DENSE),
    Rule("rank_output", "rank_output", DENSE),
]


@dataclasses.dataclass(frozen=True)
class KindSpec:
    """How one kind of checkpoint maps: name rules, keys ignored (regexes), and tied tensors
    (key → the key it must equal). `tied` keys are also written on export, as the original
    saves them; `aliases` are tied copies that only newer libraries save (accepted on import)."""

    rules: list[Rule]
    ignored: tuple[str, ...] = ()
    tied: Mapping[str, str] = dataclasses.field(default_factory=dict)
    aliases: Mapping[str, str] = dataclasses.field(default_factory=dict)


_POSITION_IDS = r"(.*\.)?embeddings\.position_ids"  # a buffer, saved by some transformers


# ---------------------------------------------------------------------------------------------
# Sizes from shapes


def _require(state, key, where):
    if key not in state:
        raise ValueError(f"cannot infer the {where}: key {key!r} is missing from the checkpoint")
    return state[key].shape


def _layer_count(state, blocks: str, where: str) -> int:
    """1 + the largest N of the `blocks`.N.* keys (e.g. blocks "txt_model.bert.encoder.layer")."""
    layer_ids = {int(m.group(1)) for k in state
                 if (m := re.match(re.escape(blocks) + r"\.(\d+)\.", k))}
    if not layer_ids:
        raise ValueError(f"cannot infer the {where}: no {blocks}.N.* keys")
    return max(layer_ids) + 1


def _num_heads(hidden: int, num_heads: int | None, where: str, flag: str) -> int:
    """`num_heads`, by default hidden / 64 (the head width of BERT, UNITER and open_clip);
    `flag`: the command-line option that sets it."""
    if num_heads is None:
        if hidden % 64:
            raise ValueError(f"{where}: hidden size {hidden} is not a multiple of 64; pass the "
                             f"number of attention heads ({flag})")
        num_heads = hidden // 64
    if hidden % num_heads:
        raise ValueError(f"{where}: hidden size {hidden} is not divisible by num_heads="
                         f"{num_heads}")
    return num_heads


def infer_transformer(state, prefix: str, num_heads: int | None,
                      where: str = "transformer") -> TransformerConfig:
    """TransformerConfig from the tensors under `prefix` (e.g. "txt_model.bert.")."""
    vocab, hidden = _require(state, f"{prefix}embeddings.word_embeddings.weight", where)
    positions = _require(state, f"{prefix}embeddings.position_embeddings.weight", where)[0]
    types = _require(state, f"{prefix}embeddings.token_type_embeddings.weight", where)[0]
    layers = _layer_count(state, f"{prefix}encoder.layer", where)
    intermediate = _require(state, f"{prefix}encoder.layer.0.intermediate.dense.weight",
                            where)[0]
    return TransformerConfig(vocab_size=vocab, hidden_size=hidden, num_layers=layers,
                             num_heads=_num_heads(hidden, num_heads, where, "--num_heads"),
                             intermediate_size=intermediate, max_position_embeddings=positions,
                             type_vocab_size=types)


def _infer_region(state, prefix: str, classifier_key: str | None) -> RegionConfig:
    hidden_feat = _require(state, f"{prefix}img_embeddings.img_linear.weight", "region config")
    box = _require(state, f"{prefix}img_embeddings.pos_linear.weight", "region config")
    classes = RegionConfig.num_classes
    if classifier_key is not None:
        classes = _require(state, classifier_key, "number of region classes")[0]
    return RegionConfig(feat_dim=hidden_feat[1], box_dim=box[1], num_classes=classes)


# ---------------------------------------------------------------------------------------------
# Per kind: name rules, trunk prefix, config from shapes


def dual_encoder_rules(trunk_prefix: str = "") -> KindSpec:
    return KindSpec(DUAL_ENCODER, (r"(txt|img)_model\.bert\.pooler\..*", _POSITION_IDS))


def pretraining_rules(trunk_prefix: str = "") -> KindSpec:
    return KindSpec(
        _prefixed(DUAL_ENCODER, "bert.", "dual_encoder/") + PRETRAIN_HEADS,
        (r"bert\.(txt|img)_model\.bert\.pooler\..*", r"itm_output\..*", _POSITION_IDS),
        tied={"cls.predictions.decoder.weight":
                  "bert.img_model.bert.embeddings.word_embeddings.weight",
              "feat_regress.weight": "bert.img_model.bert.img_embeddings.img_linear.weight"},
        # transformers >= 2.4 ties the decoder's bias to the head's bias and saves both.
        aliases={"cls.predictions.decoder.bias": "cls.predictions.bias"})


def uniter_itm_rules(trunk_prefix: str = "uniter.") -> KindSpec:
    """`trunk_prefix`: the UNITER trunk's name, "uniter." or LightningDOT's vendored "bert."."""
    return KindSpec(_prefixed(UNITER_TRUNK, trunk_prefix, "uniter/")
                    + _prefixed(ITM_HEADS[:1], trunk_prefix, "") + ITM_HEADS[1:],
                    (_POSITION_IDS,))


def uniter_pretrain_rules(trunk_prefix: str = "uniter.") -> KindSpec:
    """UNITER's released pre-training checkpoints (`UniterForPretraining`: uniter-base.pt,
    uniter-large.pt): the trunk with its pooler, the ITM head and the MLM / MRFR / MRC heads
    (the same names as LightningDOT's), with UNITER's two ties."""
    return KindSpec(
        _prefixed(UNITER_TRUNK, trunk_prefix, "uniter/")
        + _prefixed(ITM_HEADS[:1], trunk_prefix, "") + ITM_HEADS[1:2] + PRETRAIN_HEADS,
        (_POSITION_IDS,),
        tied={"cls.predictions.decoder.weight": f"{trunk_prefix}embeddings.word_embeddings.weight",
              "feat_regress.weight": f"{trunk_prefix}img_embeddings.img_linear.weight"},
        aliases={"cls.predictions.decoder.bias": "cls.predictions.bias"})


def bert_rules(trunk_prefix: str = "bert.") -> KindSpec:
    """`trunk_prefix`: "bert." (BertModel inside a pre-training model) or ""."""
    return KindSpec(_prefixed(BERT_TRUNK, trunk_prefix, ""),
                    (re.escape(trunk_prefix) + r"pooler\..*", r"cls\..*", _POSITION_IDS))


def no_trunk_prefix(state: Mapping[str, Any]) -> str:
    return ""


def uniter_trunk_prefix(state: Mapping[str, Any]) -> str:
    """"uniter." (UNITER's own checkpoints) or "bert." (LightningDOT's vendored UNITER)."""
    for prefix in ("uniter.", "bert."):
        if any(k.startswith(prefix + "embeddings.") for k in state):
            return prefix
    raise ValueError("uniter_itm checkpoint: no 'uniter.embeddings.*' or 'bert.embeddings.*' "
                     "keys found")


def uniter_pretrain_prefix(state: Mapping[str, Any]) -> str:
    if not any(k.startswith("uniter.embeddings.") for k in state):
        raise ValueError("uniter_pretrain checkpoint: no 'uniter.embeddings.*' keys found (a "
                         "UniterForPretraining state_dict, e.g. uniter-base.pt)")
    return "uniter."


def bert_trunk_prefix(state: Mapping[str, Any]) -> str:
    return "bert." if any(k.startswith("bert.embeddings.") for k in state) else ""


def _infer_dual(state, num_heads: int | None, root: str) -> DualEncoderConfig:
    classifier = "region_classifier.net.3.weight" if root else None
    project_dim = _require(state, f"{root}txt_model.encode_proj.3.weight", "projection dim")[0]
    return DualEncoderConfig(
        text=infer_transformer(state, f"{root}txt_model.bert.", num_heads, "text tower"),
        image=infer_transformer(state, f"{root}img_model.bert.", num_heads, "image tower"),
        region=_infer_region(state, f"{root}img_model.bert.", classifier),
        project_dim=project_dim)


def infer_dual_encoder(state, num_heads: int | None = None) -> DualEncoderConfig:
    return _infer_dual(state, num_heads, "")


def infer_pretraining(state, num_heads: int | None = None) -> DualEncoderConfig:
    return _infer_dual(state, num_heads, "bert.")


def infer_uniter_itm(state, num_heads: int | None = None) -> CrossEncoderConfig:
    prefix = uniter_trunk_prefix(state)
    return CrossEncoderConfig(
        transformer=infer_transformer(state, prefix, num_heads, "cross-encoder"),
        region=_infer_region(state, prefix, None))


def infer_uniter_pretrain(state, num_heads: int | None = None) -> CrossEncoderConfig:
    prefix = uniter_pretrain_prefix(state)
    return CrossEncoderConfig(
        transformer=infer_transformer(state, prefix, num_heads, "UNITER"),
        region=_infer_region(state, prefix, "region_classifier.net.3.weight"))


def infer_bert(state, num_heads: int | None = None) -> BertConfig:
    prefix = bert_trunk_prefix(state)
    return BertConfig(transformer=infer_transformer(state, prefix, num_heads, "BERT"))


# ---------------------------------------------------------------------------------------------
# open_clip CLIP (ViT image tower + CLIP text tower)


def _resblocks(torch_prefix: str, flax_prefix: str) -> list[Rule]:
    """open_clip's ResidualAttentionBlocks → models/prenorm.py's PreLNBlocks."""
    rules = [
        Rule("resblocks.{n}.ln_1", "resblocks_{n}/ln_1", LAYER_NORM),
        Rule("resblocks.{n}.attn.in_proj_weight", "resblocks_{n}/attn/in_proj/kernel", TENSOR,
             (1, 0)),
        Rule("resblocks.{n}.attn.in_proj_bias", "resblocks_{n}/attn/in_proj/bias", TENSOR),
        Rule("resblocks.{n}.attn.out_proj", "resblocks_{n}/attn/out_proj", DENSE),
        Rule("resblocks.{n}.ln_2", "resblocks_{n}/ln_2", LAYER_NORM),
        Rule("resblocks.{n}.mlp.c_fc", "resblocks_{n}/mlp/c_fc", DENSE),
        Rule("resblocks.{n}.mlp.c_proj", "resblocks_{n}/mlp/c_proj", DENSE),
    ]
    return _prefixed(rules, torch_prefix, flax_prefix)


OPEN_CLIP = (
    [Rule("visual.conv1.weight", "image_tower/visual/conv1/kernel", TENSOR, (2, 3, 1, 0)),
     Rule("visual.class_embedding", "image_tower/visual/class_embedding", TENSOR),
     Rule("visual.positional_embedding", "image_tower/visual/positional_embedding", TENSOR),
     Rule("visual.ln_pre", "image_tower/visual/ln_pre", LAYER_NORM),
     Rule("visual.ln_post", "image_tower/visual/ln_post", LAYER_NORM),
     Rule("visual.proj", "image_tower/proj", TENSOR)]
    + _resblocks("visual.transformer.", "image_tower/visual/transformer/")
    + [Rule("token_embedding", "text_tower/token_embedding", EMBED),
       Rule("positional_embedding", "text_tower/positional_embedding", TENSOR),
       Rule("ln_final", "text_tower/ln_final", LAYER_NORM),
       Rule("text_projection", "text_tower/text_projection", TENSOR),
       Rule("logit_scale", "logit_scale", TENSOR)]
    + _resblocks("transformer.", "text_tower/transformer/"))
# OpenAI's released files also hold their sizes as scalars and the causal mask as a buffer.
_OPEN_CLIP_IGNORED = (r"input_resolution", r"context_length", r"vocab_size",
                      r"(visual\.)?attn_mask")


def open_clip_rules(trunk_prefix: str = "") -> KindSpec:
    return KindSpec(OPEN_CLIP, _OPEN_CLIP_IGNORED)


def _block_sizes(state, prefix: str, where: str) -> tuple[int, int]:
    """(layers, MLP width) of the resblocks under `prefix`."""
    return (_layer_count(state, f"{prefix}resblocks", where),
            _require(state, f"{prefix}resblocks.0.mlp.c_fc.weight", where)[0])


def infer_open_clip(state, num_heads: int | None = None, *, activation: str | None = None,
                    text_num_heads: int | None = None, pool: str = "tok") -> DualEncoderConfig:
    """The CLIP model of an open_clip state_dict: ViT sizes (width, patch, grid, layers, MLP)
    and text sizes (vocabulary, context, width, layers, MLP) from shapes. Not recorded in the
    file, so given: `activation` ("quick_gelu" for OpenAI's weights and open_clip's
    *-quickgelu models, "gelu" for the others), the heads (`num_heads` for the image tower,
    `text_num_heads` for the text tower; default width / 64, open_clip's head width) and the
    pool ("tok", or "avg")."""
    if activation is None:
        raise ValueError("an open_clip checkpoint does not record its activation: pass "
                         "activation 'quick_gelu' (OpenAI's weights, the *-quickgelu models) "
                         "or 'gelu' (the others), e.g. --activation quick_gelu")
    width, channels, patch, patch_w = _require(state, "visual.conv1.weight", "image tower")
    if channels != 3 or patch != patch_w:
        raise ValueError(f"visual.conv1.weight has shape {(width, channels, patch, patch_w)}: "
                         f"expected [width, 3, patch, patch] (RGB, square patches)")
    rows = _require(state, "visual.positional_embedding", "image tower")[0]
    grid = int(round((rows - 1) ** 0.5))
    if grid * grid != rows - 1:
        raise ValueError(f"visual.positional_embedding has {rows} rows: expected 1 + g² (a "
                         f"square patch grid)")
    layers, mlp = _block_sizes(state, "visual.transformer.", "image tower")
    project_dim = _require(state, "visual.proj", "image tower")[1]
    vocab, text_width = _require(state, "token_embedding.weight", "text tower")
    context = _require(state, "positional_embedding", "text tower")[0]
    text_layers, text_mlp = _block_sizes(state, "transformer.", "text tower")
    text_project = _require(state, "text_projection", "text tower")[1]
    if text_project != project_dim:
        raise ValueError(f"text_projection gives {text_project}-d text vectors but visual.proj "
                         f"gives {project_dim}-d image vectors")
    common = dict(layer_norm_eps=1e-5, hidden_dropout=0.0, attention_dropout=0.0,
                  activation=activation, type_vocab_size=1)
    image = TransformerConfig(vocab_size=1, hidden_size=width, num_layers=layers,
                              num_heads=_num_heads(width, num_heads, "image tower",
                                                   "--num_heads"),
                              intermediate_size=mlp, max_position_embeddings=rows, **common)
    text = TransformerConfig(vocab_size=vocab, hidden_size=text_width, num_layers=text_layers,
                             num_heads=_num_heads(text_width, text_num_heads, "text tower",
                                                  "--text_num_heads"),
                             intermediate_size=text_mlp, max_position_embeddings=context,
                             **common)
    _require(state, "logit_scale", "logit scale")
    return DualEncoderConfig(
        text=text, image=image, project_dim=project_dim, text_tower="clip", image_tower="vit",
        pixels=PixelConfig(image_size=grid * patch, patch_size=patch, pool=pool),
        normalize_embeddings=True, logit_scale=float(state["logit_scale"]))
