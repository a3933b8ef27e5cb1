"""The converter: every key used, clear errors, prefixes, dtypes, .pt files, atomic output."""

import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

import ldot_jax
from ldot_jax.checkpoints import convert, pretrained
from ldot_jax.models import config as config_lib
from conftest import DATA, PARITY, SMALL_HEADS, prefix_mask


def load_npz(name):
    with np.load(PARITY / name) as data:
        return {k: data[k] for k in data.files}


def save_npz(path, state):
    np.savez(path, **state)
    return path


def flat(tree):
    return {"/".join(str(k.key) for k in p): np.asarray(v)
            for p, v in jax.tree.flatten_with_path(tree)[0]}


def assert_same_params(a, b):
    fa, fb = flat(a), flat(b)
    assert fa.keys() == fb.keys()
    for key in fa:
        np.testing.assert_array_equal(fa[key], fb[key], err_msg=key)


@pytest.fixture(scope="module")
def ldot_state():
    return load_npz("ldot_small_weights.npz")


def convert_state(tmp_path, state, kind="lightningdot", name="model"):
    source = save_npz(tmp_path / f"{name}.npz", state)
    return ldot_jax.convert_checkpoint(kind, source, tmp_path / name, num_heads=SMALL_HEADS)


def test_missing_key_is_named(tmp_path, ldot_state):
    state = dict(ldot_state)
    del state["txt_model.bert.encoder.layer.1.output.dense.bias"]
    with pytest.raises(ValueError, match=r"missing key\(s\) \['txt_model\.bert\.encoder\.layer"
                                         r"\.1\.output\.dense\.bias'\]"):
        convert_state(tmp_path, state)


def test_extra_key_is_named(tmp_path, ldot_state):
    state = dict(ldot_state, **{"txt_model.extra_head.weight": np.zeros((3, 3), np.float32)})
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['txt_model\.extra_head\.weight'\]"):
        convert_state(tmp_path, state)


def test_wrong_shape_names_key_and_both_shapes(tmp_path, ldot_state):
    state = dict(ldot_state)
    state["img_model.encode_proj.0.weight"] = np.zeros((64, 31), np.float32)
    with pytest.raises(ValueError) as err:
        convert_state(tmp_path, state)
    message = str(err.value)
    assert ("img_model.encode_proj.0.weight: checkpoint shape (64, 31), model expects (64, 32)"
            in message)
    assert "missing" not in message and "unknown" not in message


def test_untied_pretrain_weights_are_an_error(tmp_path):
    state = load_npz("ldot_small_pretrain_weights.npz")
    state["cls.predictions.decoder.weight"] = state["cls.predictions.decoder.weight"] + 1.0
    with pytest.raises(ValueError, match="cls.predictions.decoder.weight.*must be tied"):
        convert_state(tmp_path, state, "lightningdot_pretrain")


def test_params_round_trip_to_state_dict(converted, ldot_state):
    """Export of the converted params reproduces every used tensor of the original exactly."""
    loaded = pretrained.load_pretrained(converted["lightningdot"])
    exported = convert.params_to_state_dict("lightningdot", loaded.params)
    used = {k: v for k, v in ldot_state.items() if ".pooler." not in k}
    assert exported.keys() == used.keys()
    for key in used:
        np.testing.assert_array_equal(exported[key], used[key], err_msg=key)
    assert sorted(loaded.metadata["ignored_keys"]) == sorted(set(ldot_state) - set(used))


def test_pretrain_round_trip_with_tied_tensors(converted):
    state = load_npz("ldot_small_pretrain_weights.npz")
    loaded = pretrained.load_pretrained(converted["lightningdot_pretrain"])
    exported = convert.params_to_state_dict("lightningdot_pretrain", loaded.params)
    used = {k: v for k, v in state.items()
            if ".pooler." not in k and not k.startswith("itm_output.")}
    assert exported.keys() == used.keys()
    for key in used:
        np.testing.assert_array_equal(exported[key], used[key], err_msg=key)


def test_random_params_round_trip(tmp_path):
    """init → export → import gives back the same params (mapping is a bijection)."""
    config = convert.infer_config("uniter_itm", load_npz("uniter_small_weights.npz"), SMALL_HEADS)
    params = pretrained.init_params("uniter_itm", config, jax.random.key(3))
    state = convert.params_to_state_dict("uniter_itm", params)
    back = convert.state_dict_to_params("uniter_itm", state, config)
    assert_same_params(back.params, params)


def test_ddp_prefix_gamma_beta_and_fp16(tmp_path, converted, ldot_state):
    """`module.` prefixes, old LayerNorm names and fp16 tensors load as the plain state."""
    state = {}
    for key, value in ldot_state.items():
        if key.endswith("LayerNorm.weight"):
            key = key[: -len("weight")] + "gamma"
        elif key.endswith("LayerNorm.bias"):
            key = key[: -len("bias")] + "beta"
        state["module." + key] = value
    plain = pretrained.load_pretrained(converted["lightningdot"]).params
    assert_same_params(pretrained.load_pretrained(convert_state(tmp_path, state)).params, plain)

    half = {k: v.astype(np.float16) for k, v in ldot_state.items()}
    loaded = pretrained.load_pretrained(convert_state(tmp_path, half, name="half")).params
    for key, value in flat(loaded).items():
        assert value.dtype == np.float32, key
        np.testing.assert_allclose(value, flat(plain)[key], rtol=1e-3, atol=1e-3)


def test_torch_checkpoint_with_model_dict_wrapper(tmp_path, converted, ldot_state):
    torch = pytest.importorskip("torch", reason="the [torch] extra reads .pt files")
    state = {k: torch.from_numpy(v) for k, v in ldot_state.items()}
    state["txt_model.bert.embeddings.word_embeddings.weight"] = (
        state["txt_model.bert.embeddings.word_embeddings.weight"].to(torch.bfloat16))
    path = tmp_path / "biencoder.pt"
    torch.save({"model_dict": state, "optimizer_dict": None, "offset": 0, "epoch": 3}, path)
    out = ldot_jax.convert_checkpoint("lightningdot", path, tmp_path / "pt",
                                      num_heads=SMALL_HEADS)
    got = flat(pretrained.load_pretrained(out).params)
    want = flat(pretrained.load_pretrained(converted["lightningdot"]).params)
    for key in want:
        tol = 1e-2 if "word_embeddings" in key and "text_tower" in key else 0
        np.testing.assert_allclose(got[key], want[key], rtol=tol, atol=tol, err_msg=key)


def test_bert_checkpoint_matches_the_text_tower(tmp_path, ldot_io):
    """A Hugging Face-style BERT state_dict (bert.* + pooler + MLM/NSP heads) converts to a
    trunk that reproduces the text tower's states; so does a bare BertModel state_dict."""
    txt = {k[len("txt_model.bert."):]: v for k, v in load_npz("ldot_small_weights.npz").items()
           if k.startswith("txt_model.bert.")}
    hf = {"bert." + k: v for k, v in txt.items()}
    hf["cls.seq_relationship.weight"] = np.zeros((2, 32), np.float32)
    hf["bert.embeddings.position_ids"] = np.arange(64)[None]
    for name, state in (("hf", hf), ("bare", txt)):
        source = save_npz(tmp_path / f"{name}.npz", state)
        out = ldot_jax.convert_checkpoint("bert", source, tmp_path / name, num_heads=SMALL_HEADS)
        loaded = ldot_jax.load_pretrained(out)
        model = pretrained.build_model("bert", loaded.config)
        states = model.apply({"params": loaded.params}, ldot_io["in_txt_input_ids"],
                             ldot_io["in_txt_attention_mask"])
        mask = ldot_io["in_txt_attention_mask"].astype(bool)
        np.testing.assert_allclose(np.asarray(states)[mask], ldot_io["out_txt_seq"][mask],
                                   atol=1e-5)


def test_lightningdot_vendored_uniter_prefix(tmp_path, converted, uniter_io):
    """LightningDOT's vendored UNITER names its trunk `bert.`: same model."""
    state = {("bert." + k[len("uniter."):] if k.startswith("uniter.") else k): v
             for k, v in load_npz("uniter_small_weights.npz").items()}
    out = convert_state(tmp_path, state, "uniter_itm", "vendored")
    assert_same_params(pretrained.load_pretrained(out).params,
                       pretrained.load_pretrained(converted["uniter_itm"]).params)


def test_heads_default_needs_multiple_of_64(tmp_path):
    with pytest.raises(ValueError, match="hidden size 32 is not a multiple of 64.*--num_heads"):
        ldot_jax.convert_checkpoint("lightningdot", PARITY / "ldot_small_weights.npz",
                                    tmp_path / "x")


def test_bad_kind_and_missing_file(tmp_path):
    with pytest.raises(ValueError, match="unknown checkpoint kind 'clip'.*lightningdot"):
        ldot_jax.convert_checkpoint("clip", PARITY / "ldot_small_weights.npz", tmp_path / "x")
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        ldot_jax.convert_checkpoint("lightningdot", tmp_path / "nope.pt", tmp_path / "x")


def test_write_interrupted_midway_keeps_the_good_output(tmp_path, ldot_state, monkeypatch):
    """A crash after part of the new output is on disk leaves the old directory intact."""
    good = convert_state(tmp_path, ldot_state, name="out")
    before = flat(pretrained.load_pretrained(good).params)
    changed = {k: v + 1.0 for k, v in ldot_state.items()}
    source = save_npz(tmp_path / "changed.npz", changed)
    real_save = pretrained.checkpoint.save_tree

    def save_then_crash(path, tree):
        real_save(path, tree)  # the new params are fully written…
        raise OSError("disk full")  # …and the config never is

    monkeypatch.setattr(pretrained.checkpoint, "save_tree", save_then_crash)
    with pytest.raises(OSError, match="disk full"):
        ldot_jax.convert_checkpoint("lightningdot", source, good, num_heads=SMALL_HEADS)
    monkeypatch.undo()
    after = flat(pretrained.load_pretrained(good).params)
    assert before.keys() == after.keys()
    for key in before:
        np.testing.assert_array_equal(after[key], before[key], err_msg=key)
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")], "temporary leftovers"
    # Without the crash, the same call replaces the old model.
    ldot_jax.convert_checkpoint("lightningdot", source, good, num_heads=SMALL_HEADS)
    replaced = flat(pretrained.load_pretrained(good).params)
    np.testing.assert_array_equal(replaced["text_tower/encode_proj/dense_in/bias"],
                                  changed["txt_model.encode_proj.0.bias"])


def test_never_replaces_a_directory_that_is_not_a_model(tmp_path):
    precious = tmp_path / "models"
    (precious / "sub").mkdir(parents=True)
    (precious / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="refusing to replace .*models"):
        ldot_jax.convert_checkpoint("lightningdot", PARITY / "ldot_small_weights.npz", precious,
                                    num_heads=SMALL_HEADS)
    assert (precious / "precious.txt").read_text() == "keep me" and (precious / "sub").is_dir()


def test_command_line(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    ok = subprocess.run([sys.executable, "-m", "ldot_jax.convert", "--kind", "uniter_itm",
                         "--input", str(PARITY / "uniter_small_weights.npz"),
                         "--output", str(tmp_path / "cli"), "--num_heads", "4"],
                        capture_output=True, text=True, env=env, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert "wrote uniter_itm model" in ok.stdout
    model, params = ldot_jax.load_cross_encoder(tmp_path / "cli")
    assert isinstance(model, ldot_jax.CrossEncoder)
    bad = subprocess.run([sys.executable, "-m", "ldot_jax.convert", "--kind", "lightningdot",
                          "--input", str(PARITY / "uniter_small_weights.npz"),
                          "--output", str(tmp_path / "bad"), "--num_heads", "4"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode == 2
    assert "error:" in bad.stderr and "txt_model.encode_proj.3.weight" in bad.stderr
    assert not (tmp_path / "bad").exists()


REFERENCE_LISTS = {"lightningdot": "ldot_state_dict.txt",
                   "lightningdot_pretrain": "ldot_pretrain_state_dict.txt",
                   "uniter_itm": "uniter_state_dict.txt"}


def reference_shapes(name):
    """{key: shape} from the original base-size state_dict listings."""
    shapes = {}
    for line in (DATA / "reference" / name).read_text().splitlines():
        if line and not line.startswith("#"):
            key, rest = line.split(" ", 1)
            shapes[key] = tuple(int(x) for x in re.findall(r"\d+", rest.rsplit(" ", 1)[0]))
    return shapes


@pytest.mark.parametrize("kind", sorted(REFERENCE_LISTS))
def test_base_size_names_and_shapes_match_the_released_checkpoints(kind):
    """Base-size Flax params map onto exactly the released state_dict keys and shapes (less the
    ignored ones), and the sizes inferred back from them are the base config."""
    config = (config_lib.base_cross_encoder_config() if kind == "uniter_itm"
              else config_lib.base_dual_encoder_config())
    abstract = pretrained.abstract_params(kind, config)
    # Zero-stride arrays: the shapes of 220M parameters without allocating them.
    params = jax.tree.map(lambda s: np.broadcast_to(np.float32(0), s.shape), abstract)
    state = convert.params_to_state_dict(kind, params)
    reference = reference_shapes(REFERENCE_LISTS[kind])
    spec = convert.kind_spec(kind, convert.trunk_prefix(kind, reference))
    ignored = {k for k in reference if any(re.fullmatch(p, k) for p in spec.ignored)}
    assert {k: tuple(v.shape) for k, v in state.items()} == {
        k: v for k, v in reference.items() if k not in ignored}
    assert convert.infer_config(kind, state) == config
