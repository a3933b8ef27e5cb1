"""Packaged config names resolve from any directory; anything else is left to ml_collections."""

import os

from ldot_jax import configs


def test_packaged_names_resolve_from_anywhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    here = os.path.dirname(configs.__file__)
    for spec in ("ldot_jax/configs/demo.py:finetune,tiny", "demo.py:finetune,tiny"):
        assert configs.resolve(spec) == os.path.join(here, "demo.py") + ":finetune,tiny"
    assert configs.resolve("ldot_jax/configs/base.py") == os.path.join(here, "base.py")
    # a path that exists where it is named wins over the packaged file
    (tmp_path / "demo.py").write_text("")
    assert configs.resolve("demo.py:x") == "demo.py:x"
    # unknown names and other directories are not guessed at
    assert configs.resolve("ldot_jax/configs/nope.py") == "ldot_jax/configs/nope.py"
    assert configs.resolve("other/demo.py:x") == "other/demo.py:x"


def test_flags_are_rewritten_in_both_spellings(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    here = os.path.dirname(configs.__file__)
    out = configs.resolve_flags(["--config=ldot_jax/configs/demo.py:rerank", "--workdir=w",
                                 "--config", "pretrain.py", "--config.seed=3"])
    assert out == [f"--config={here}/demo.py:rerank", "--workdir=w",
                   "--config", f"{here}/pretrain.py", "--config.seed=3"]


def test_a_repeated_config_override_is_refused_before_training(tmp_path, capsys):
    """ml_collections appends a repeated tuple override to the first one's value (stem
    channels (32, 64, 128) then (32, 64, 128, 128) ran a 7-convolution stem), so `ldot train`
    refuses any key given twice, in either spelling, and names it."""
    from ldot_jax.tools import train_cli
    argv = ["--config=ldot_jax/configs/demo_pixels.py:towers", f"--workdir={tmp_path}/run",
            "--config.model.pixels.stem_channels=(32,64,128)", "--config.seed", "3",
            "--config.model.pixels.stem_channels=(32,64,128,128)", "--config.seed=4",
            "--config.train.num_steps=2"]
    assert configs.repeated_overrides(argv) == ["config.model.pixels.stem_channels",
                                                "config.seed"]
    assert configs.repeated_overrides(["--config.a=1", "--noconfig.b", "--config.b"]) == [
        "config.b"]
    assert configs.repeated_overrides(argv[:4]) == []
    assert train_cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "--config.model.pixels.stem_channels, --config.seed given more than once" in err
    assert not os.path.exists(tmp_path / "run")
