"""`make demo` runs end to end and reproduces the original outputs."""

from ldot_jax import demo


def test_demo_reproduces_the_original(tmp_path, capsys):
    diffs = demo.run(str(tmp_path / "demo"))
    assert max(diffs.values()) <= 1e-5, diffs
    out = capsys.readouterr().out
    assert "cross-encoder rank scores" in out and "caption → images" in out
    assert (tmp_path / "demo" / "models" / "lightningdot" / "ldot_config.json").exists()
