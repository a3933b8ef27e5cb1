"""Model directories: round trips, numerics overrides, and clear errors for bad directories."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

import ldot_jax
from ldot_jax.checkpoints import pretrained
from ldot_jax.checkpoints.checkpoint import CheckpointError
from ldot_jax.models import config as config_lib
from conftest import prefix_mask


def copy_dir(src, dst):
    shutil.copytree(src, dst)
    return dst


def small_dual_config():
    t = config_lib.TransformerConfig(vocab_size=50, hidden_size=16, num_layers=1, num_heads=2,
                                     intermediate_size=32, max_position_embeddings=16)
    return config_lib.DualEncoderConfig(text=t, image=t, project_dim=8, cls_token_id=1,
                                        region=config_lib.RegionConfig(feat_dim=12))


def test_save_load_round_trip(tmp_path):
    config = small_dual_config()
    params = pretrained.init_params("lightningdot", config, jax.random.key(0))
    out = ldot_jax.save_pretrained(tmp_path / "m", "lightningdot", config, params, {"note": 1})
    loaded = ldot_jax.load_pretrained(out)
    assert loaded.kind == "lightningdot" and loaded.config == config
    assert loaded.metadata == {"note": 1}
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(loaded.params)):
        np.testing.assert_array_equal(a, b)


def test_save_rejects_params_that_do_not_fit(tmp_path):
    config = small_dual_config()
    params = pretrained.init_params("lightningdot", config, jax.random.key(0))
    del params["text_tower"]["encode_proj"]
    with pytest.raises(CheckpointError, match="missing 6 parameter.*text_tower/encode_proj"):
        ldot_jax.save_pretrained(tmp_path / "m", "lightningdot", config, params)
    assert not (tmp_path / "m").exists()


def test_missing_directory_and_config(tmp_path, converted):
    with pytest.raises(CheckpointError, match="does not exist"):
        ldot_jax.load_dual_encoder(tmp_path / "absent")
    broken = copy_dir(converted["lightningdot"], tmp_path / "noconfig")
    os.remove(broken / pretrained.CONFIG_FILE)
    with pytest.raises(CheckpointError, match="ldot_config.json is missing"):
        ldot_jax.load_dual_encoder(broken)


def test_half_written_params(tmp_path, converted):
    broken = copy_dir(converted["lightningdot"], tmp_path / "half")
    shutil.rmtree(broken / pretrained.PARAMS_DIR)
    with pytest.raises(CheckpointError, match="no parameter checkpoint"):
        ldot_jax.load_dual_encoder(broken)
    broken = copy_dir(converted["lightningdot"], tmp_path / "half2")
    for name in os.listdir(broken / pretrained.PARAMS_DIR):
        if "METADATA" in name:
            os.remove(broken / pretrained.PARAMS_DIR / name)
    with pytest.raises(CheckpointError, match="not a complete Orbax checkpoint"):
        ldot_jax.load_dual_encoder(broken)


def test_config_that_disagrees_with_params(tmp_path, converted):
    broken = copy_dir(converted["lightningdot"], tmp_path / "edited")
    path = broken / pretrained.CONFIG_FILE
    body = json.loads(path.read_text())
    body["model"]["project_dim"] = 12
    path.write_text(json.dumps(body))
    with pytest.raises(CheckpointError,
                       match=r"encode_proj/dense_out/kernel: stored shape \(64, 24\), model "
                             r"expects \(64, 12\)"):
        ldot_jax.load_dual_encoder(broken)
    body["model"]["projection"] = 3
    path.write_text(json.dumps(body))
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['projection'\]"):
        ldot_jax.load_dual_encoder(broken)


def test_loader_checks_the_kind(converted):
    with pytest.raises(CheckpointError, match="'uniter_itm' model, not a dual encoder"):
        ldot_jax.load_dual_encoder(converted["uniter_itm"])
    with pytest.raises(CheckpointError, match="'lightningdot' model, not a cross-encoder"):
        ldot_jax.load_cross_encoder(converted["lightningdot"])


@pytest.mark.parametrize("impl", ["xla", "fused"])
def test_bfloat16_compute(converted, ldot_io, uniter_io, impl):
    """bf16 compute keeps float32 params and gives float32 outputs close to the float32
    model, for both towers and the cross-encoder."""
    io, u = ldot_io, uniter_io
    region_mask = io["in_img_attention_mask"][:, 1:]
    text_mask = prefix_mask(u["in_txt_lens"], 8)
    cross_regions = prefix_mask(u["in_num_bbs"], 6)
    outs = {}
    for dtype in ("float32", "bfloat16"):
        dual, params = ldot_jax.load_dual_encoder(converted["lightningdot"], dtype=dtype,
                                                  attention_impl=impl)
        cross, cparams = ldot_jax.load_cross_encoder(converted["uniter_itm"], dtype=dtype,
                                                     attention_impl=impl)
        assert all(x.dtype == np.float32 for x in jax.tree.leaves((params, cparams)))
        outs[dtype] = (
            dual.apply({"params": params}, {"input_ids": io["in_txt_input_ids"],
                                            "attention_mask": io["in_txt_attention_mask"]},
                       method=dual.encode_text),
            dual.apply({"params": params}, {"region_feat": io["in_img_feat"],
                                            "boxes": io["in_img_pos_feat"],
                                            "region_mask": region_mask},
                       method=dual.encode_image),
            cross.apply({"params": cparams}, {"input_ids": u["in_input_ids"],
                                              "attention_mask": text_mask},
                        {"region_feat": u["in_img_feat"], "boxes": u["in_img_pos_feat"],
                         "region_mask": cross_regions}).pooled)
    for low, reference in zip(outs["bfloat16"], outs["float32"]):
        reference = np.asarray(reference)
        error = np.abs(np.asarray(low, np.float32) - reference).max()
        assert 0 < error < 0.05 * np.abs(reference).max(), error
    assert outs["bfloat16"][0].dtype == np.float32
