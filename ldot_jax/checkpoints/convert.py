"""PyTorch state_dicts (LightningDOT, UNITER, BERT) ⇄ Flax params, and the converter command.

    ldot convert --kind lightningdot --input flickr-ft.pt --output /ckpt/flickr

The input is a PyTorch checkpoint (.pt / .bin, read with torch: `pip install ldot_jax[torch]`;
LightningDOT's `{"model_dict": ...}` wrapper is unwrapped) or an .npz of the state_dict. Sizes
are inferred from the tensors; the number of attention heads is `--num_heads` (default
hidden / 64). Every key must be used: unknown or missing keys and shape mismatches are errors
that list them. Keys the Flax model has no use for (BERT poolers LightningDOT never reads, the
pre-training model's unused ITM head, BERT's own pre-training heads) are reported as ignored.

Names are translated by `Rule`s that work both ways, so the same tables also export Flax params
back to a PyTorch-named state_dict (`params_to_state_dict`).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import re
from typing import Any, Iterable, Mapping

import numpy as np

from ldot_jax.checkpoints import pretrained
from ldot_jax.models.config import (BertConfig, CrossEncoderConfig, DualEncoderConfig,
                                    RegionConfig, TransformerConfig)

log = logging.getLogger(__name__)

KINDS = ("lightningdot", "lightningdot_pretrain", "uniter_itm", "bert")

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
    templates name a single tensor (a raw parameter), not a module.
    """

    torch: str
    flax: str
    kind: str

    def _regex(self, template: str, sep: str) -> re.Pattern:
        return _compile(template, sep, self.kind)

    def to_flax(self, key: str) -> tuple[str, bool] | None:
        """PyTorch key → (Flax path, transpose?) or None."""
        m = self._regex(self.torch, ".").match(key)
        if not m:
            return None
        groups = {k: v for k, v in m.groupdict().items() if k != "leaf"}
        path = self.flax.format(**groups)
        if self.kind == TENSOR:
            return path, False
        leaf = _LEAVES[self.kind][m.group("leaf")]
        return f"{path}/{leaf}", leaf == "kernel"

    def to_torch(self, path: str) -> tuple[str, bool] | None:
        """Flax path → (PyTorch key, transpose?) or None."""
        m = self._regex(self.flax, "/").match(path)
        if not m:
            return None
        groups = {k: v for k, v in m.groupdict().items() if k != "leaf"}
        key = self.torch.format(**groups)
        if self.kind == TENSOR:
            return key, False
        inverse = {v: k for k, v in _LEAVES[self.kind].items()}
        return f"{key}.{inverse[m.group('leaf')]}", m.group("leaf") == "kernel"


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
    return [Rule(torch_prefix + r.torch, flax_prefix + r.flax, r.kind) for r in rules]


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


def kind_spec(kind: str, trunk_prefix: str = "") -> KindSpec:
    """Rules for `kind`. `trunk_prefix` is the UNITER trunk's name for uniter_itm
    ("uniter." or LightningDOT's vendored "bert.") and the optional "bert." of BERT."""
    if kind == "lightningdot":
        return KindSpec(DUAL_ENCODER, (r"(txt|img)_model\.bert\.pooler\..*", _POSITION_IDS))
    if kind == "lightningdot_pretrain":
        return KindSpec(
            _prefixed(DUAL_ENCODER, "bert.", "dual_encoder/") + PRETRAIN_HEADS,
            (r"bert\.(txt|img)_model\.bert\.pooler\..*", r"itm_output\..*", _POSITION_IDS),
            tied={"cls.predictions.decoder.weight":
                      "bert.img_model.bert.embeddings.word_embeddings.weight",
                  "feat_regress.weight": "bert.img_model.bert.img_embeddings.img_linear.weight"},
            # transformers >= 2.4 ties the decoder's bias to the head's bias and saves both.
            aliases={"cls.predictions.decoder.bias": "cls.predictions.bias"})
    if kind == "uniter_itm":
        return KindSpec(_prefixed(UNITER_TRUNK, trunk_prefix, "uniter/")
                        + _prefixed(ITM_HEADS[:1], trunk_prefix, "") + ITM_HEADS[1:],
                        (_POSITION_IDS,))
    if kind == "bert":
        return KindSpec(_prefixed(BERT_TRUNK, trunk_prefix, ""),
                        (re.escape(trunk_prefix) + r"pooler\..*", r"cls\..*", _POSITION_IDS))
    raise ValueError(f"unknown checkpoint kind {kind!r}; valid kinds are {list(KINDS)}")


# ---------------------------------------------------------------------------------------------
# Reading state_dicts


def read_state_dict(path: str | os.PathLike, trust_pickle: bool = False) -> dict[str, np.ndarray]:
    """A state_dict as float32 / int NumPy arrays from .npz or a PyTorch .pt/.bin/.pth file.

    PyTorch files are read with `torch.load(weights_only=True)` unless `trust_pickle` (only for
    files you trust: unpickling can run code).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file {path} does not exist")
    if path.endswith(".npz"):
        try:
            with np.load(path, allow_pickle=False) as data:
                state = {k: data[k] for k in data.files}
        except Exception as e:
            raise ValueError(f"{path}: not a readable .npz state_dict: {e}") from e
    else:
        state = _read_torch(path, trust_pickle)
    return {k: _to_numpy(k, v, path) for k, v in state.items()}


def _read_torch(path: str, trust_pickle: bool) -> Mapping[str, Any]:
    try:
        import torch
    except ImportError as e:
        raise ImportError(f"reading {path} needs PyTorch: pip install 'ldot_jax[torch]', or "
                          f"save the state_dict as .npz") from e
    try:
        obj = torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except Exception as e:
        hint = "" if trust_pickle else (" If you trust this file, retry with --trust_pickle "
                                        "(it may hold pickled Python objects).")
        raise ValueError(f"{path}: torch.load failed: {e}.{hint}") from e
    return unwrap_state_dict(obj, path)


def unwrap_state_dict(obj: Any, path: str = "<checkpoint>") -> Mapping[str, Any]:
    """The state_dict inside a training checkpoint ({"model_dict": …} for LightningDOT,
    {"state_dict"|"model": …} elsewhere), or `obj` itself."""
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path}: expected a state_dict (a mapping of names to tensors), got "
                         f"{type(obj).__name__}")
    for wrapper in ("model_dict", "state_dict", "model"):
        if wrapper in obj and isinstance(obj[wrapper], Mapping):
            return obj[wrapper]
    return obj


def _to_numpy(key: str, value: Any, path: str) -> np.ndarray:
    if hasattr(value, "detach"):  # torch.Tensor; bf16 has no NumPy dtype, go through float32
        value = value.detach().cpu()
        value = value.float() if value.is_floating_point() else value
        value = value.numpy()
    value = np.asarray(value)
    if value.dtype.kind == "f":
        return value.astype(np.float32)  # fp16 / bf16 / fp64 checkpoints → float32 params
    if value.dtype.kind in "iub":
        return value
    raise ValueError(f"{path}: tensor {key!r} has unsupported dtype {value.dtype}")


def normalize_keys(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Strips a DistributedDataParallel `module.` prefix and renames old-BERT LayerNorm
    `gamma`/`beta` to `weight`/`bias`."""
    keys = list(state)
    strip = "module." if keys and all(k.startswith("module.") for k in keys) else ""
    out = {}
    for key, value in state.items():
        name = key[len(strip):]
        name = re.sub(r"\.gamma\Z", ".weight", re.sub(r"\.beta\Z", ".bias", name))
        if name in out:
            raise ValueError(f"state_dict has both {key!r} and another key that normalizes to "
                             f"{name!r}")
        out[name] = value
    return out


def trunk_prefix(kind: str, state: Mapping[str, Any]) -> str:
    """The trunk's key prefix: "uniter." / "bert." for uniter_itm, "bert." or "" for bert."""
    if kind == "uniter_itm":
        for prefix in ("uniter.", "bert."):
            if any(k.startswith(prefix + "embeddings.") for k in state):
                return prefix
        raise ValueError("uniter_itm checkpoint: no 'uniter.embeddings.*' or "
                         "'bert.embeddings.*' keys found")
    if kind == "bert":
        return "bert." if any(k.startswith("bert.embeddings.") for k in state) else ""
    return ""


# ---------------------------------------------------------------------------------------------
# Sizes from shapes


def _require(state, key, where):
    if key not in state:
        raise ValueError(f"cannot infer the {where}: key {key!r} is missing from the checkpoint")
    return state[key].shape


def infer_transformer(state, prefix: str, num_heads: int | None,
                      where: str = "transformer") -> TransformerConfig:
    """TransformerConfig from the tensors under `prefix` (e.g. "txt_model.bert.")."""
    vocab, hidden = _require(state, f"{prefix}embeddings.word_embeddings.weight", where)
    positions = _require(state, f"{prefix}embeddings.position_embeddings.weight", where)[0]
    types = _require(state, f"{prefix}embeddings.token_type_embeddings.weight", where)[0]
    layer_ids = {int(m.group(1)) for k in state
                 if (m := re.match(re.escape(prefix) + r"encoder\.layer\.(\d+)\.", k))}
    if not layer_ids:
        raise ValueError(f"cannot infer the {where}: no {prefix}encoder.layer.N.* keys")
    intermediate = _require(state, f"{prefix}encoder.layer.0.intermediate.dense.weight",
                            where)[0]
    if num_heads is None:
        if hidden % 64:
            raise ValueError(f"{where}: hidden size {hidden} is not a multiple of 64; pass the "
                             f"number of attention heads (--num_heads)")
        num_heads = hidden // 64
    if hidden % num_heads:
        raise ValueError(f"{where}: hidden size {hidden} is not divisible by num_heads="
                         f"{num_heads}")
    return TransformerConfig(vocab_size=vocab, hidden_size=hidden,
                             num_layers=max(layer_ids) + 1, num_heads=num_heads,
                             intermediate_size=intermediate, max_position_embeddings=positions,
                             type_vocab_size=types)


def _infer_region(state, prefix: str, classifier_key: str | None) -> RegionConfig:
    hidden_feat = _require(state, f"{prefix}img_embeddings.img_linear.weight", "region config")
    box = _require(state, f"{prefix}img_embeddings.pos_linear.weight", "region config")
    classes = RegionConfig.num_classes
    if classifier_key is not None:
        classes = _require(state, classifier_key, "number of region classes")[0]
    return RegionConfig(feat_dim=hidden_feat[1], box_dim=box[1], num_classes=classes)


def infer_config(kind: str, state: Mapping[str, np.ndarray], num_heads: int | None = None):
    """The model config of a (normalized) state_dict of `kind`."""
    if kind in ("lightningdot", "lightningdot_pretrain"):
        root = "bert." if kind == "lightningdot_pretrain" else ""
        classifier = "region_classifier.net.3.weight" if root else None
        project_dim = _require(state, f"{root}txt_model.encode_proj.3.weight",
                               "projection dim")[0]
        return DualEncoderConfig(
            text=infer_transformer(state, f"{root}txt_model.bert.", num_heads, "text tower"),
            image=infer_transformer(state, f"{root}img_model.bert.", num_heads, "image tower"),
            region=_infer_region(state, f"{root}img_model.bert.", classifier),
            project_dim=project_dim)
    prefix = trunk_prefix(kind, state)
    if kind == "uniter_itm":
        return CrossEncoderConfig(
            transformer=infer_transformer(state, prefix, num_heads, "cross-encoder"),
            region=_infer_region(state, prefix, None))
    if kind == "bert":
        return BertConfig(transformer=infer_transformer(state, prefix, num_heads, "BERT"))
    raise ValueError(f"unknown checkpoint kind {kind!r}; valid kinds are {list(KINDS)}")


# ---------------------------------------------------------------------------------------------
# Mapping


@dataclasses.dataclass
class Conversion:
    kind: str
    config: Any
    params: Any
    ignored: list[str]


def _set(tree: dict, path: str, value) -> None:
    *parents, leaf = path.split("/")
    for name in parents:
        tree = tree.setdefault(name, {})
    tree[leaf] = value


def _torch_name(spec: KindSpec, path: str) -> tuple[str, bool]:
    for rule in spec.rules:
        found = rule.to_torch(path)
        if found:
            return found
    raise KeyError(f"no PyTorch name for Flax parameter {path!r}")


def state_dict_to_params(kind: str, state: Mapping[str, np.ndarray], config) -> Conversion:
    """Maps a normalized state_dict onto the Flax params of `kind` / `config`.

    Raises ValueError listing unknown keys, missing keys (by their PyTorch names) and shape
    mismatches (key, checkpoint shape, expected shape, in PyTorch layout).
    """
    spec = kind_spec(kind, trunk_prefix(kind, state))
    abstract = pretrained.abstract_params(kind, config)
    expected = {p: s.shape for p, s in pretrained.flatten_params(abstract).items()}
    params, ignored, unknown, mismatched, mismatched_keys = {}, [], [], [], set()
    for key, value in state.items():
        if any(re.fullmatch(pattern, key) for pattern in spec.ignored):
            ignored.append(key)
            continue
        source = spec.tied.get(key) or spec.aliases.get(key)
        if source:
            _check_tied(state, key, source)
            continue
        target = next((t for r in spec.rules if (t := r.to_flax(key))), None)
        if target is None or target[0] not in expected:
            unknown.append(key)
            continue
        path, transpose = target
        value = value.T if transpose else value
        if tuple(value.shape) != tuple(expected[path]):
            want = expected[path][::-1] if transpose else expected[path]
            mismatched.append(f"{key}: checkpoint shape {tuple(state[key].shape)}, model "
                              f"expects {tuple(want)}")
            mismatched_keys.add(key)
            continue
        _set(params, path, np.ascontiguousarray(value))
    converted = pretrained.flatten_params(params)
    missing = sorted(name for p in expected if p not in converted
                     and (name := _torch_name(spec, p)[0]) not in mismatched_keys)
    problems = []
    if unknown:
        problems.append(f"unknown key(s) {sorted(unknown)}")
    if missing:
        problems.append(f"missing key(s) {missing}")
    if mismatched:
        problems.append("shape mismatch: " + "; ".join(mismatched))
    if problems:
        raise ValueError(f"{kind} checkpoint does not match the model "
                         f"({pretrained.describe(config)}): " + " | ".join(problems))
    return Conversion(kind, config, params, sorted(ignored))


def _check_tied(state, key, source):
    if source not in state:
        return  # the source's own absence is reported as a missing key
    if state[key].shape != state[source].shape or not np.array_equal(state[key], state[source]):
        raise ValueError(f"{key!r} must be tied to (equal) {source!r}, but it differs "
                         f"(shapes {state[key].shape} and {state[source].shape})")


def params_to_state_dict(kind: str, params, trunk: str | None = None) -> dict[str, np.ndarray]:
    """Flax params → a PyTorch-named state_dict (NumPy), the inverse of the import.

    Tied tensors are written under both names, as torch.save does. `trunk` is the trunk prefix
    for uniter_itm ("uniter." default) and bert ("bert." default).
    """
    if trunk is None:
        trunk = {"uniter_itm": "uniter.", "bert": "bert."}.get(kind, "")
    spec = kind_spec(kind, trunk)
    state = {}
    for path, value in pretrained.flatten_params(params).items():
        key, transpose = _torch_name(spec, path)
        value = np.asarray(value)
        state[key] = value.T if transpose else value
    for key, source in spec.tied.items():
        if source in state:
            state[key] = state[source]
    return state


# ---------------------------------------------------------------------------------------------
# The public conversion


def convert_checkpoint(kind: str, input_path: str | os.PathLike, output_dir: str | os.PathLike,
                       num_heads: int | None = None, trust_pickle: bool = False) -> str:
    """Converts a PyTorch / .npz state_dict of `kind` into an ldot_jax model directory.

    Returns the output directory; load it with `ldot_jax.load_dual_encoder`,
    `load_cross_encoder`, `load_pretraining_model` or `load_pretrained`. The output is written
    to a temporary directory and renamed, so an existing good directory survives a failure.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown checkpoint kind {kind!r}; valid kinds are {list(KINDS)}")
    state = normalize_keys(read_state_dict(input_path, trust_pickle))
    config = infer_config(kind, state, num_heads)
    conversion = state_dict_to_params(kind, state, config)
    if conversion.ignored:
        log.info("ignored %d key(s) the Flax model does not use: %s", len(conversion.ignored),
                 conversion.ignored)
    metadata = {"source": os.path.abspath(input_path), "ignored_keys": conversion.ignored}
    return pretrained.save_pretrained(output_dir, kind, config, conversion.params, metadata)
