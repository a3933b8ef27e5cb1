"""`make demo` runs end to end and reproduces the original outputs."""

from ldot_jax import demo


def test_demo_reproduces_the_original(tmp_path, capsys):
    diffs = demo.run(str(tmp_path / "demo"), data_dir=str(tmp_path / "data"),
                     train_size=130, val_size=10, test_size=10)
    assert max(diffs.values()) <= 1e-5, diffs
    out = capsys.readouterr().out
    assert "cross-encoder rank scores" in out and "caption → images" in out
    assert "train 130, val 10 images" in out.replace("test 10, ", "")
    assert (tmp_path / "demo" / "scenes.png").exists()
    assert (tmp_path / "demo" / "models" / "lightningdot" / "ldot_config.json").exists()
