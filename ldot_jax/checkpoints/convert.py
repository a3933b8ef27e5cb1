"""PyTorch state_dicts (LightningDOT, UNITER, BERT, open_clip) ⇄ Flax params, and the
converter command.

    ldot convert --kind lightningdot --input flickr-ft.pt --output /ckpt/flickr
    ldot convert --kind open_clip --input open_clip_model.bin --output /ckpt/clip \
        --activation quick_gelu

The input is a PyTorch checkpoint (.pt / .bin, read with torch: `pip install ldot_jax[torch]`;
LightningDOT's `{"model_dict": ...}` wrapper is unwrapped) or an .npz of the state_dict. Sizes
are inferred from the tensors; the number of attention heads is `--num_heads` (default
hidden / 64). Every key must be used: unknown or missing keys and shape mismatches are errors
that list them. Keys the Flax model has no use for (BERT poolers LightningDOT never reads, the
pre-training model's unused ITM head, BERT's own pre-training heads) are reported as ignored.

Names are translated by the `Rule`s of checkpoints/torch_names.py, which work both ways, so the
same tables also export Flax params back to a PyTorch-named state_dict (`params_to_state_dict`).
Which rules, trunk prefix and size inference a kind uses is its registry entry's `converter`
(checkpoints/kinds.py).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from typing import Any, Mapping

import ml_dtypes
import numpy as np

from ldot_jax.checkpoints import kinds, pretrained, torch_files, torch_names
from ldot_jax.core import fileutil, numerics
from ldot_jax.models import vit

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# Reading state_dicts


def read_state_dict(path: str | os.PathLike, trust_pickle: bool = False) -> dict[str, np.ndarray]:
    """A state_dict as float32 / int NumPy arrays from .npz or a PyTorch .pt/.bin/.pth file.

    PyTorch files are read without PyTorch by a restricted unpickler (`torch_files`: tensors
    and plain values only, like `torch.load(weights_only=True)`) unless `trust_pickle` (only
    for files you trust: unpickling can run code; needs PyTorch).
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
    """The state_dict of a PyTorch file: read without PyTorch (`torch_files`, tensors and
    plain values only), or with `torch.load` when the caller trusts the file's pickle."""
    if not trust_pickle:
        return unwrap_state_dict(torch_files.load(path), path)
    try:
        import torch
    except ImportError as e:
        raise ImportError(f"reading {path} with trust_pickle needs PyTorch: pip install "
                          f"'ldot_jax[torch]' (without trust_pickle no PyTorch is needed)") from e
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise ValueError(f"{path}: torch.load failed: {e}") from e
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
    if value.dtype == ml_dtypes.bfloat16:  # torch_files' bf16 tensors
        value = value.astype(np.float32)
    if value.dtype.kind == "f":
        numerics.check_finite(value, f"{path}: tensor {key!r}")
        numerics.check_fits(value, np.float32, f"{path}: tensor {key!r}")
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


# ---------------------------------------------------------------------------------------------
# A kind's converter (the registry entry's): trunk prefix, name rules, config


def trunk_prefix(kind: str, state: Mapping[str, Any]) -> str:
    """The prefix a `kind` checkpoint saves its trunk under ("uniter." / "bert." / "")."""
    return kinds.get(kind).converter.trunk_prefix(state)


def kind_spec(kind: str, trunk: str | None = None) -> torch_names.KindSpec:
    """The name rules of `kind` for trunk prefix `trunk` (default: the one written on export)."""
    converter = kinds.get(kind).converter
    return converter.rules(converter.export_prefix if trunk is None else trunk)


def infer_config(kind: str, state: Mapping[str, np.ndarray], num_heads: int | None = None,
                 **options):
    """The model config of a (normalized) state_dict of `kind`, from its tensors' shapes and
    `options` (the kind's Converter.options: what its files do not record)."""
    converter = kinds.get(kind).converter
    unknown = sorted(k for k, v in options.items() if v is not None
                     and k not in converter.options)
    if unknown:
        raise ValueError(f"option(s) {unknown} do not apply to {kind} checkpoints"
                         + (f"; its options are {list(converter.options)}"
                            if converter.options else ""))
    given = {k: v for k, v in options.items() if v is not None}
    return converter.infer(state, num_heads, **given)


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


def _torch_name(spec: torch_names.KindSpec, path: str) -> tuple[str, torch_names.Layout]:
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
        path, layout = target
        want = layout.torch_shape(expected[path])
        if tuple(value.shape) != want:  # compared in the PyTorch layout, before permuting
            mismatched.append(f"{key}: checkpoint shape {tuple(value.shape)}, model "
                              f"expects {want}")
            mismatched_keys.add(key)
            continue
        _set(params, path, np.asarray(layout.to_flax(value), order="C"))  # 0-d stays 0-d
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
        hint = ""
        if kind == "uniter_itm" and "feat_regress.weight" in state:
            hint = (". This is a UNITER pre-training checkpoint (UniterForPretraining, e.g. "
                    "uniter-base.pt): convert it with --kind uniter_pretrain; a re-ranker "
                    "initializes from that directory (--config.init.model=DIR)")
        raise ValueError(f"{kind} checkpoint does not match the model "
                         f"({pretrained.describe(config)}): " + " | ".join(problems) + hint)
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
    spec = kind_spec(kind, trunk)
    state = {}
    for path, value in pretrained.flatten_params(params).items():
        key, layout = _torch_name(spec, path)
        state[key] = layout.to_torch(np.asarray(value))
    for key, source in spec.tied.items():
        if source in state:
            state[key] = state[source]
    return state


# ---------------------------------------------------------------------------------------------
# The public conversion


def convert_checkpoint(kind: str, input_path: str | os.PathLike, output_dir: str | os.PathLike,
                       num_heads: int | None = None, trust_pickle: bool = False,
                       **options) -> str:
    """Converts a PyTorch / .npz state_dict of `kind` into an ldot_jax model directory.

    `options`: what the kind's files do not record (kinds' Converter.options; open_clip:
    activation="quick_gelu" | "gelu", text_num_heads, pool), and image_size: a ViT model for
    pictures of another size (`resize_image_input`). A kind with a tokenizer of its
    own (open_clip: CLIP's BPE) saves it in the directory. Returns the output directory;
    load it with `ldot_jax.load_dual_encoder`, `load_cross_encoder`, `load_pretraining_model`
    or `load_pretrained`. The output is written
    to a temporary directory and renamed, so an existing good directory survives a failure.
    """
    if kind not in kinds.KINDS:  # before the file is read
        raise ValueError(f"unknown checkpoint kind {kind!r}; valid kinds are {list(kinds.NAMES)}")
    fileutil.check_not_inside(output_dir, [input_path])  # replacing the output would delete it
    image_size = options.pop("image_size", None)
    state = normalize_keys(read_state_dict(input_path, trust_pickle))
    config = infer_config(kind, state, num_heads, **options)
    conversion = state_dict_to_params(kind, state, config)
    if conversion.ignored:
        log.info("ignored %d key(s) the Flax model does not use: %s", len(conversion.ignored),
                 conversion.ignored)
    metadata = {"source": os.path.abspath(input_path), "ignored_keys": conversion.ignored}
    params = conversion.params
    if image_size is not None:
        metadata["image_size_converted_from"] = getattr(getattr(config, "pixels", None),
                                                        "image_size", None)
        config, params = resize_image_input(config, params, int(image_size))
    make_tokenizer = kinds.get(kind).converter.tokenizer
    tokenizer = make_tokenizer(config) if make_tokenizer else None
    return pretrained.save_pretrained(output_dir, kind, config, params, metadata,
                                      tokenizer=tokenizer, inputs=[input_path])


def resize_image_input(config, params, image_size: int):
    """(config, params) of a ViT dual encoder for pictures of `image_size` (a multiple of the
    patch size): the learned patch positions resized bicubically to the new grid, the class
    token's row kept (vit.resize_positional_embedding, as open_clip and big_vision do when
    fine-tuning at another resolution). The patch embedding is unchanged."""
    if getattr(config, "image_tower", None) != "vit":
        raise ValueError(f"image_size={image_size}: only a ViT image tower (open_clip) reads "
                         f"pictures; this model's image tower is "
                         f"{getattr(config, 'image_tower', None)!r}")
    patch = config.pixels.patch_size
    if image_size <= 0 or image_size % patch:
        raise ValueError(f"image_size={image_size}: expected a positive multiple of the "
                         f"patch size {patch}")
    grid = image_size // patch
    visual = dict(params["image_tower"]["visual"])
    visual["positional_embedding"] = vit.resize_positional_embedding(
        visual["positional_embedding"], grid)
    params = {**params, "image_tower": {**params["image_tower"], "visual": visual}}
    config = dataclasses.replace(
        config, pixels=dataclasses.replace(config.pixels, image_size=image_size),
        image=dataclasses.replace(config.image, max_position_embeddings=grid * grid + 1))
    return config, params
