"""The trunks (BERT, UNITER), the retrieval towers of LightningDOT, and the tower registries
(which also hold the CLIP text tower, models/clip_text.py, and the ViT, models/vit.py).

A tower takes ONE input pytree: text towers `{"input_ids": i32[B, L], "attention_mask":
[B, L]}`, the region tower `{"region_feat": f[B, R, F], "boxes": f[B, R, 7], "region_mask":
[B, R]}`, the ViT `{"pixels": uint8[B, S, S, 3]}`. Everything above the models (data, tasks,
extraction, retrieval, re-ranking, evaluation) passes these pytrees along without unpacking
them; only a tower and the collate of
its input (data/batching.py) know the fields. Towers are built by name (`TEXT_TOWERS`,
`IMAGE_TOWERS`; `DualEncoderConfig.text_tower` / `.image_tower`).

Shapes: B batch, L text length, R regions, H hidden, F region feature dim, P projection dim.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax.numpy as jnp

from ldot_jax.models import inputs
from ldot_jax.models.clip_text import ClipTextTower
from ldot_jax.models.config import RegionConfig, TransformerConfig
from ldot_jax.models.inputs import region_fields, text_fields  # noqa: F401 (the towers' API)
from ldot_jax.models.layers import (Dropout, TextEmbeddings, TransformerEncoder, dense, gelu,
                                    layer_norm)
from ldot_jax.models.outputs import TowerOutput
from ldot_jax.models.vit import ViTTower, dummy_pixels


class BertTrunk(nn.Module):
    """BERT embeddings + encoder (no pooler: LightningDOT reads the [CLS] state directly)."""

    config: TransformerConfig

    def setup(self):
        self.embeddings = TextEmbeddings(self.config)
        self.encoder = TransformerEncoder(self.config)

    def __call__(self, input_ids, attention_mask, deterministic: bool = True):
        """input_ids: i32[B, L]; attention_mask: [B, L] → states [B, L, H]."""
        inputs.check_text(input_ids, attention_mask, self.config)
        hidden = self.embeddings(input_ids, deterministic=deterministic)
        return self.encoder(hidden, attention_mask, deterministic)


class RegionEmbeddings(nn.Module):
    """UNITER image embeddings: LN(LN_img(img_linear(f)) + LN_pos(pos_linear(box)) + type[1]).

    For SMRM, masked regions' features are replaced by `mask_embedding[1]` (the original zeroes
    them and adds the table row; row 0 is always zero, so unmasked features are unchanged).
    """

    config: TransformerConfig
    region: RegionConfig

    def setup(self):
        c = self.config
        self.img_linear = dense(c, c.hidden_size)
        self.img_layer_norm = layer_norm(c)
        self.pos_linear = dense(c, c.hidden_size)
        self.pos_layer_norm = layer_norm(c)
        # [2, F]; row 0 stays unused (the original zeroes it), row 1 replaces masked features.
        self.mask_embedding = self.param(
            "mask_embedding", nn.initializers.normal(c.initializer_range),
            (2, self.region.feat_dim), c.params_dtype)
        self.layer_norm = layer_norm(c)
        self.dropout = Dropout(c.hidden_dropout)

    def __call__(self, region_feat, boxes, type_embedding, masked_regions=None,
                 deterministic: bool = True, zero_masked: bool = True):
        """region_feat: f[B, R, F]; boxes: f[B, R, 7]; type_embedding: [B, R, H];
        masked_regions: [B, R] or None → [B, R, H]. zero_masked: masked regions' features
        become the mask row (the original's pre-training collate zeroes them and its model
        adds the row); False adds the row to the given features (the original model alone)."""
        if masked_regions is not None:
            mask_row = self.mask_embedding[1].astype(region_feat.dtype)
            masked = masked_regions[..., None].astype(bool)
            region_feat = (jnp.where(masked, mask_row, region_feat) if zero_masked
                           else region_feat + jnp.where(masked, mask_row, 0))
        image = self.img_layer_norm(self.img_linear(region_feat))
        position = self.pos_layer_norm(self.pos_linear(boxes))
        hidden = self.layer_norm(image + position + type_embedding)
        return self.dropout(hidden, deterministic=deterministic)

    def img_linear_kernel(self):
        """f32[F, H]: the img_linear kernel, which the MRFR head uses transposed (tied)."""
        return self.img_linear.variables["params"]["kernel"]


def pack_text_and_regions(text_mask, region_mask):
    """UNITER's packing: text tokens then regions, with no padding gap after the text.

    Args:
      text_mask: [B, L] prefix mask; region_mask: [B, R] prefix mask.
    Returns:
      gather_index: i32[B, L + R] into concat([text, regions], axis=1);
      mask: bool[B, L + R], True for the tl + nbb real positions of each row.
    """
    text_len = text_mask.shape[1]
    total = text_len + region_mask.shape[1]
    tl = text_mask.astype(jnp.int32).sum(axis=1, keepdims=True)
    nbb = region_mask.astype(jnp.int32).sum(axis=1, keepdims=True)
    position = jnp.arange(total, dtype=jnp.int32)[None, :]
    gather_index = jnp.where(position < tl, position, text_len + position - tl)
    gather_index = jnp.minimum(gather_index, total - 1)
    return gather_index, position < tl + nbb


class UniterTrunk(nn.Module):
    """UNITER single-stream transformer over text tokens (type 0) and regions (type 1).

    The token-type table is shared by text and regions. With `pack=True` (the cross-encoder)
    the regions follow the real text tokens without a gap, as the original's gather_index does;
    the image tower, whose only text token is [CLS], needs no packing.
    """

    config: TransformerConfig
    region: RegionConfig

    def setup(self):
        self.embeddings = TextEmbeddings(self.config)
        self.region_embeddings = RegionEmbeddings(self.config, self.region)
        self.encoder = TransformerEncoder(self.config)

    def __call__(self, input_ids, text_mask, region_feat, boxes, region_mask,
                 masked_regions=None, pack: bool = False, deterministic: bool = True,
                 zero_masked: bool = True):
        """input_ids: i32[B, L]; text_mask: [B, L]; region_feat: f[B, R, F]; boxes: f[B, R, 7];
        region_mask: [B, R]; masked_regions: [B, R] or None (zero_masked: see
        RegionEmbeddings).

        Returns (states [B, L + R, H], mask bool[B, L + R]), in packed order if `pack`.
        """
        inputs.check_text(input_ids, text_mask, self.config, mask_name="text_mask")
        inputs.check_regions(region_feat, boxes, region_mask, self.region, masked_regions)
        inputs.check_batch_sizes(input_ids=input_ids, region_feat=region_feat)
        text = self.embeddings(input_ids, deterministic=deterministic)
        types = self.embeddings.type_embedding(jnp.ones_like(region_mask, dtype=jnp.int32))
        regions = self.region_embeddings(region_feat.astype(self.config.compute_dtype),
                                         boxes.astype(self.config.compute_dtype), types,
                                         masked_regions, deterministic, zero_masked)
        hidden = jnp.concatenate([text, regions], axis=1)
        mask = jnp.concatenate([text_mask, region_mask], axis=1).astype(bool)
        if pack:
            inputs.check_prefix_mask("text_mask", text_mask)
            inputs.check_prefix_mask("region_mask", region_mask)
            gather_index, mask = pack_text_and_regions(text_mask, region_mask)
            hidden = jnp.take_along_axis(hidden, gather_index[..., None], axis=1)
        return self.encoder(hidden, mask, deterministic), mask


class EncodeProjection(nn.Module):
    """LightningDOT's encode_proj: Linear(H, 2H) → GELU → LayerNorm(2H) → Linear(2H, P)."""

    config: TransformerConfig
    project_dim: int

    @nn.compact
    def __call__(self, cls_state):
        """cls_state: [B, H] → f32[B, P]."""
        c = self.config
        hidden = gelu(dense(c, 2 * c.hidden_size, "dense_in")(cls_state))
        hidden = layer_norm(c, "layer_norm")(hidden)
        return dense(c, self.project_dim, "dense_out")(hidden).astype(jnp.float32)


class TextTower(nn.Module):
    """BERT over `[CLS] wordpieces [SEP]`; retrieval vector = encode_proj(h_last[:, 0])."""

    config: TransformerConfig
    project_dim: int

    def setup(self):
        self.bert = BertTrunk(self.config)
        self.encode_proj = EncodeProjection(self.config, self.project_dim)

    def __call__(self, text: Mapping[str, Any], deterministic: bool = True) -> TowerOutput:
        """text: {"input_ids": i32[B, L], "attention_mask": [B, L]} → TowerOutput (S = L)."""
        input_ids, attention_mask = text_fields(text)
        sequence = self.bert(input_ids, attention_mask, deterministic)
        cls_state = sequence[:, 0]
        return TowerOutput(sequence, attention_mask.astype(bool), cls_state,
                           self.encode_proj(cls_state))


class RegionTower(nn.Module):
    """UNITER fed one text token ([CLS], from its own word table) and the regions.

    Retrieval vector = encode_proj(h_last[:, 0]).
    """

    config: TransformerConfig
    region: RegionConfig
    project_dim: int
    cls_token_id: int = 101

    def setup(self):
        self.uniter = UniterTrunk(self.config, self.region)
        self.encode_proj = EncodeProjection(self.config, self.project_dim)

    def __call__(self, image: Mapping[str, Any], masked_regions=None,
                 deterministic: bool = True) -> TowerOutput:
        """image: {"region_feat": f[B, R, F], "boxes": f[B, R, 7], "region_mask": [B, R]};
        masked_regions: [B, R] or None (SMRM) → TowerOutput (S = 1 + R)."""
        region_feat, boxes, region_mask = region_fields(image)
        # Built from region_mask so they are sharded like the batch ([B@data, 1] on a mesh).
        first = jnp.ones_like(region_mask[:, :1], dtype=jnp.int32)
        sequence, mask = self.uniter(first * self.cls_token_id, first, region_feat,
                                     boxes, region_mask, masked_regions,
                                     deterministic=deterministic)
        cls_state = sequence[:, 0]
        return TowerOutput(sequence, mask, cls_state, self.encode_proj(cls_state))


# ---------------------------------------------------------------------------------------------
# The smallest inputs (shape inference)

def dummy_text(batch: int = 1, length: int = 2) -> dict:
    """The smallest text input (shape inference)."""
    return {"input_ids": jnp.zeros((batch, length), jnp.int32),
            "attention_mask": jnp.ones((batch, length), jnp.int32)}


def dummy_regions(region: RegionConfig, batch: int = 1, regions: int = 1) -> dict:
    """The smallest region image input (shape inference)."""
    return {"region_feat": jnp.zeros((batch, regions, region.feat_dim), jnp.float32),
            "boxes": jnp.zeros((batch, regions, region.box_dim), jnp.float32),
            "region_mask": jnp.ones((batch, regions), jnp.int32)}


# ---------------------------------------------------------------------------------------------
# The tower registries


@dataclasses.dataclass(frozen=True)
class TowerSpec:
    """build: the DualEncoderConfig → the tower module; dummy_input: the config → the
    smallest input pytree; collate: the name of its input's collate in data/batching.py."""

    build: Callable[[Any], nn.Module]
    dummy_input: Callable[[Any], dict]
    collate: str


TEXT_TOWERS: dict[str, TowerSpec] = {
    "bert": TowerSpec(lambda c: TextTower(c.text, c.project_dim), lambda c: dummy_text(),
                      "text"),
    "clip": TowerSpec(lambda c: ClipTextTower(c.text, c.project_dim, c.normalize_embeddings),
                      lambda c: dummy_text(), "text"),
}
IMAGE_TOWERS: dict[str, TowerSpec] = {
    "uniter_regions": TowerSpec(
        lambda c: RegionTower(c.image, c.region, c.project_dim, c.cls_token_id),
        lambda c: dummy_regions(c.region), "regions"),
    "vit": TowerSpec(
        lambda c: ViTTower(c.image, c.pixels, c.project_dim, c.normalize_embeddings),
        lambda c: dummy_pixels(c.pixels), "pixels"),
}


def _lookup(table: dict, name: str, what: str) -> TowerSpec:
    if name not in table:
        raise ValueError(f"unknown {what} {name!r}; the {what}s are {list(table)}")
    return table[name]


def text_tower(name: str) -> TowerSpec:
    return _lookup(TEXT_TOWERS, name, "text tower")


def image_tower(name: str) -> TowerSpec:
    return _lookup(IMAGE_TOWERS, name, "image tower")


def image_input_name(model_config) -> str:
    """The image input (data/batching.IMAGE_INPUTS) that a model config's image tower reads:
    a DualEncoderConfig or a run's `config.model` section; a config without an image tower
    (the cross-encoder) reads regions."""
    name = (model_config.get("image_tower") if hasattr(model_config, "get")
            else getattr(model_config, "image_tower", None))
    return image_tower(name).collate if name else "regions"
