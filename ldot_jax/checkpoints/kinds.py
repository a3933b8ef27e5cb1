"""The model kinds: one registry entry holds every per-kind fact.

A kind is what a model directory's `ldot_config.json` names and what a run's `model_kind` is:
its config dataclass, how to build the Flax module, dummy inputs for shape inference, how its
PyTorch checkpoints are named and sized (the converter), the training tasks that can train it
and where its dual encoder (the two towers) sits in its params. Adding a kind is one entry
here (plus its module and its name rules).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax.numpy as jnp

from ldot_jax.checkpoints import torch_names
from ldot_jax.data.clip_tokenizer import ClipTokenizer
from ldot_jax.models import config as config_lib
from ldot_jax.models.config import BertConfig, CrossEncoderConfig, DualEncoderConfig
from ldot_jax.models.cross_encoder import CrossEncoder
from ldot_jax.models.dual_encoder import DualEncoder
from ldot_jax.models.pretraining import CrossEncoderForPretraining, DualEncoderForPretraining
from ldot_jax.models import towers
from ldot_jax.models.towers import BertTrunk
from ldot_jax.models.vit import dummy_pixels


@dataclasses.dataclass(frozen=True)
class Converter:
    """How the original code's checkpoints of a kind map onto its params.

    rules: trunk prefix → the name rules (torch_names.KindSpec); trunk_prefix: state_dict → the
    prefix its trunk is saved under; export_prefix: the prefix written on export; infer:
    (state_dict, num_heads, **options) → the config; options: the keyword options `infer`
    takes (what the file does not record, e.g. open_clip's activation); tokenizer: config →
    the tokenizer a converted model directory carries (None: the user passes the one the
    original was trained with)."""

    rules: Callable[[str], torch_names.KindSpec]
    trunk_prefix: Callable[[Mapping[str, Any]], str]
    export_prefix: str
    infer: Callable[..., Any]
    options: tuple[str, ...] = ()
    tokenizer: Callable[[Any], Any] | None = None


@dataclasses.dataclass(frozen=True)
class ModelKind:
    """name: the kind's name; config_cls: its config dataclass; build: config → Flax module;
    dummy_inputs: config → the smallest inputs of `module.init`; converter: its PyTorch
    checkpoints; tasks: the training tasks that train it (() : not trained here);
    dual_encoder: the path of the DualEncoder's params ({"text_tower", "image_tower"}) in
    the kind's params (() : they are the params), None when the kind holds no towers;
    warm_starts: what a model directory of this kind can initialize (checkpoints/
    initialize.py): target ("model": a dual encoder, laid out as the pre-training model;
    "cross": a uniter_itm re-ranker; "text" / "image": a tower) → params → the subtree laid
    out like the target's; summary: one line for listings."""

    name: str
    config_cls: type
    build: Callable[[Any], nn.Module]
    dummy_inputs: Callable[[Any], tuple]
    converter: Converter
    tasks: tuple[str, ...]
    dual_encoder: tuple[str, ...] | None
    warm_starts: Mapping[str, Callable[[Any], Any]]
    summary: str

    @property
    def is_dual_encoder(self) -> bool:
        return self.dual_encoder is not None

    def dual_encoder_params(self, params):
        """The DualEncoder's params inside this kind's params."""
        if self.dual_encoder is None:
            raise ValueError(f"a {self.name!r} model holds no dual encoder")
        for name in self.dual_encoder:
            params = params[name]
        return params

    def replace_dual_encoder(self, params, dual):
        """This kind's params with the DualEncoder's params replaced by `dual`."""
        if self.dual_encoder is None:
            raise ValueError(f"a {self.name!r} model holds no dual encoder")
        if not self.dual_encoder:
            return dual
        head, *rest = self.dual_encoder
        inner = dataclasses.replace(self, dual_encoder=tuple(rest))
        return {**params, head: inner.replace_dual_encoder(params[head], dual)}


def _dual_inputs(c) -> tuple:
    """(text, image) dummy inputs of a dual encoder's towers (from the tower registries)."""
    return (towers.text_tower(c.text_tower).dummy_input(c),
            towers.image_tower(c.image_tower).dummy_input(c))


def _cross_inputs(c: CrossEncoderConfig) -> tuple:
    """The re-ranker's dummy inputs: a caption and regions, or pixels for a patch re-ranker
    (so its ViT's params exist)."""
    image = (dummy_pixels(c.pixels) if c.image_tower == "vit"
             else towers.dummy_regions(c.region))
    return towers.dummy_text(), image


def _cross_image_tower(params):
    """A re-ranker → the image tower it initializes (VLDeformer): a patch re-ranker's own ViT
    → the ViT tower's trunk (its projection starts fresh); a region re-ranker's single-stream
    trunk → the region tower's."""
    if "vit" in params:
        return {"visual": params["vit"]}
    return {"uniter": params["uniter"]}


def _dual_warm_starts(path: tuple[str, ...]) -> dict[str, Callable[[Any], Any]]:
    """What the towers of a dual-encoder kind (at `path` in its params) initialize."""
    def dual(params):
        for name in path:
            params = params[name]
        return params

    def cross(params):
        towers_ = dual(params)
        text = towers_["text_tower"]["bert"]
        if "visual" in towers_["image_tower"]:
            # A pixel dual → the patch re-ranker: its ViT from the image tower, the single
            # stream's words and layers from the text tower (region embeddings start fresh).
            return {"uniter": {"embeddings": text["embeddings"], "encoder": text["encoder"]},
                    "vit": towers_["image_tower"]["visual"]}
        # The re-ranker from the towers: words from the text tower, regions and layers from
        # the image tower.
        image = towers_["image_tower"]["uniter"]
        return {"uniter": {"embeddings": text["embeddings"],
                           "region_embeddings": image["region_embeddings"],
                           "encoder": image["encoder"]}}

    return {"model": (lambda p: p) if path == ("dual_encoder",) else (
                lambda p: {"dual_encoder": dual(p)}),
            "cross": cross,
            "text": lambda p: dual(p)["text_tower"],
            "image": lambda p: dual(p)["image_tower"]}


KINDS: dict[str, ModelKind] = {k.name: k for k in (
    ModelKind("lightningdot", DualEncoderConfig, DualEncoder,
              _dual_inputs,
              Converter(torch_names.dual_encoder_rules, torch_names.no_trunk_prefix, "",
                        torch_names.infer_dual_encoder),
              tasks=("cmr", "distill"), dual_encoder=(), warm_starts=_dual_warm_starts(()),
              summary="LightningDOT's two towers (fine-tuning: cmr, distill)"),
    ModelKind("lightningdot_pretrain", DualEncoderConfig, DualEncoderForPretraining,
              lambda c: _dual_inputs(c) + (jnp.ones((1, 1), jnp.int32),),
              Converter(torch_names.pretraining_rules, torch_names.no_trunk_prefix, "",
                        torch_names.infer_pretraining),
              tasks=("cmr", "vmlm", "mrfr", "mrckl", "distill"),
              dual_encoder=("dual_encoder",), warm_starts=_dual_warm_starts(("dual_encoder",)),
              summary="the towers with the VMLM / MRFR / MRC heads (pre-training)"),
    ModelKind("uniter_itm", CrossEncoderConfig, CrossEncoder, _cross_inputs,
              Converter(torch_names.uniter_itm_rules, torch_names.uniter_trunk_prefix,
                        "uniter.", torch_names.infer_uniter_itm),
              tasks=("itm",), dual_encoder=None,
              warm_starts={
                  "cross": lambda p: p, "image": _cross_image_tower,
                  # VLDeformer: the towers from the re-ranker
                  "text": lambda p: {"bert": {k: p["uniter"][k] for k in ("embeddings",
                                                                          "encoder")}}},
              summary="UNITER ITM, the cross-encoder re-ranker (itm)"),
    ModelKind("uniter_pretrain", CrossEncoderConfig, CrossEncoderForPretraining,
              lambda c: (towers.dummy_text(), towers.dummy_regions(c.region),
                         jnp.ones((1, 1), jnp.int32)),
              Converter(torch_names.uniter_pretrain_rules, torch_names.uniter_pretrain_prefix,
                        "uniter.", torch_names.infer_uniter_pretrain),
              tasks=(), dual_encoder=None,
              warm_starts={
                  # the re-ranker: trunk, pooler and ITM head (rank_output starts fresh)
                  "cross": lambda p: {k: p[k] for k in ("uniter", "pooler", "itm_output")},
                  # LightningDOT's image tower, as the paper initializes it
                  "image": lambda p: {"uniter": p["uniter"]},
                  "text": lambda p: {"bert": {k: p["uniter"][k] for k in ("embeddings",
                                                                          "encoder")}}},
              summary="UNITER pre-training (uniter-base.pt): trunk + ITM / MLM / MRFR / MRC "
                      "heads; initializes the re-ranker and the towers"),
    ModelKind("open_clip", DualEncoderConfig, DualEncoder,
              _dual_inputs,
              Converter(torch_names.open_clip_rules, torch_names.no_trunk_prefix, "",
                        torch_names.infer_open_clip,
                        options=("activation", "text_num_heads", "pool"),
                        tokenizer=lambda c: ClipTokenizer(
                            context_length=c.text.max_position_embeddings)),
              tasks=("cmr", "distill"), dual_encoder=(),
              warm_starts={"model": lambda p: p, "text": lambda p: p["text_tower"],
                           "image": lambda p: p["image_tower"]},
              summary="open_clip's CLIP: ViT image tower + CLIP text tower (fine-tuning: cmr, "
                      "distill)"),
    ModelKind("bert", BertConfig, lambda c: BertTrunk(c.transformer),
              lambda c: towers.text_fields(towers.dummy_text()),
              Converter(torch_names.bert_rules, torch_names.bert_trunk_prefix, "bert.",
                        torch_names.infer_bert),
              tasks=(), dual_encoder=None,
              warm_starts={"text": lambda p: {"bert": p}, "image": lambda p: {"uniter": p}},
              summary="a BERT trunk (initializes a text tower)"),
)}
NAMES = tuple(KINDS)


def get(name: str) -> ModelKind:
    """The registry entry of kind `name` (a ValueError lists the valid kinds)."""
    if name not in KINDS:
        raise ValueError(f"unknown model kind {name!r}; valid kinds are {list(KINDS)}")
    return KINDS[name]


def model_config(kind: str, values: Mapping[str, Any]):
    """The config dataclass of a model `kind` from a (nested) dict or ml_collections
    ConfigDict, e.g. `model_config(cfg.model_kind, cfg.model)`; errors name the bad key."""
    if hasattr(values, "to_dict"):
        values = values.to_dict()
    return config_lib.from_dict(get(kind).config_cls, values, where="model")


def dual_encoder_kinds() -> tuple[str, ...]:
    """The kinds whose params hold the two towers (what the index build and the Retriever
    accept)."""
    return tuple(name for name, kind in KINDS.items() if kind.is_dual_encoder)


def check_tasks(kind: str, tasks: tuple[str, ...]) -> None:
    """Every task of a run's mix must train `kind`."""
    allowed = get(kind).tasks
    wrong = [t for t in tasks if t not in allowed]
    if wrong:
        raise ValueError(f"tasks {wrong} cannot train model kind {kind!r}; its tasks are "
                         f"{allowed}" + ("" if allowed else " (it is not trained here)"))
