"""Per-tower initialization from converted checkpoints (the parity fixtures): what is copied
equals the source, what the source lacks keeps its fresh value, mismatches are named."""

import jax
import numpy as np
import pytest

from ldot_jax.checkpoints import initialize, pretrained
from ldot_jax.checkpoints.checkpoint import CheckpointError

flat = pretrained.flatten_params


def _fresh(kind, config):
    return jax.device_get(pretrained.init_params(kind, config, jax.random.key(42)))


def test_towers_from_lightningdot_and_uniter(converted):
    ldot = pretrained.load_pretrained(converted["lightningdot"])
    uniter = pretrained.load_pretrained(converted["uniter_itm"])
    fresh = _fresh("lightningdot_pretrain", ldot.config)
    params = initialize.from_pretrained(fresh, "lightningdot_pretrain",
                                        {"text": converted["lightningdot"],
                                         "image": converted["uniter_itm"]})
    got, before = flat(params), flat(fresh)
    for path, value in flat(ldot.params["text_tower"]).items():
        np.testing.assert_array_equal(got[f"dual_encoder/text_tower/{path}"], value)
    for path, value in flat(uniter.params["uniter"]).items():
        key = f"dual_encoder/image_tower/uniter/{path}"
        if key in got:
            np.testing.assert_array_equal(got[key], value)
    # UNITER has no encode_proj and the heads are not part of a tower: both stay fresh.
    for path in got:
        if "image_tower/encode_proj" in path or path.startswith("mlm_head"):
            np.testing.assert_array_equal(got[path], before[path])
    assert set(got) == set(before)


def test_whole_model_and_bert_tower(converted, tmp_path):
    ldot = pretrained.load_pretrained(converted["lightningdot"])
    fresh = _fresh("lightningdot", ldot.config)
    params = initialize.from_pretrained(fresh, "lightningdot",
                                        {"model": converted["lightningdot_pretrain"]})
    source = pretrained.load_pretrained(converted["lightningdot_pretrain"]).params
    jax.tree.map(np.testing.assert_array_equal, params, jax.device_get(source["dual_encoder"]))
    # A BERT directory (the text tower's trunk saved as kind "bert") initializes a tower.
    from ldot_jax.models.config import BertConfig
    bert_dir = pretrained.save_pretrained(tmp_path / "bert", "bert",
                                          BertConfig(transformer=ldot.config.text),
                                          ldot.params["text_tower"]["bert"])
    params = initialize.from_pretrained(fresh, "lightningdot", {"text": bert_dir})
    for path, value in flat(ldot.params["text_tower"]["bert"]).items():
        np.testing.assert_array_equal(flat(params)[f"text_tower/bert/{path}"], value)
    for path, value in flat(fresh["text_tower"]["encode_proj"]).items():
        np.testing.assert_array_equal(flat(params)[f"text_tower/encode_proj/{path}"], value)


def test_mismatches_are_named(converted):
    uniter = pretrained.load_pretrained(converted["uniter_itm"])
    fresh = _fresh("lightningdot", pretrained.load_pretrained(converted["lightningdot"]).config)
    with pytest.raises(CheckpointError, match="cannot initialize the model"):
        initialize.from_pretrained(fresh, "lightningdot", {"model": converted["uniter_itm"]})
    with pytest.raises(ValueError, match="unknown target"):
        initialize.from_pretrained(fresh, "lightningdot", {"decoder": converted["uniter_itm"]})
    bigger = jax.tree.map(lambda x: np.zeros((x.shape[0] + 1,) + x.shape[1:], x.dtype)
                          if x.ndim == 2 else x, fresh)
    with pytest.raises(CheckpointError, match="has shape"):
        initialize.from_pretrained(bigger, "lightningdot", {"image": converted["uniter_itm"]})
    assert uniter.kind == "uniter_itm"
