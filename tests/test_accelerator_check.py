"""`ldot bench accelerator --small` on the CPU: every section runs and reports what it should
(the train step in both dtypes, fused attention equal to xla's, parity with the original at
both precisions, exact search agreeing with NumPy, re-ranker and pipeline rates), and the JSON
and Markdown reports are written."""

import json

import pytest

from ldot_jax.bench import accelerator

pytestmark = pytest.mark.xdist_group("accelerator")


def test_the_accelerator_check_runs_every_section_on_cpu(tmp_path):
    out = tmp_path / "acc"
    assert accelerator.main(["--small", "--out", str(out)]) == 0
    report = json.loads((out / "accelerator.json").read_text())
    s = report["sections"]
    assert set(s) == {"train", "attention", "parity", "search", "rerank", "pipeline"}
    assert not [name for name, section in s.items() if "error" in section]
    small = accelerator.PROFILES["small"]
    for dtype in ("bfloat16", "float32"):
        row = s["train"][dtype]
        assert row["dtype"] == dtype and row["global_batch"] == small["batch"]
        assert row["step_ms"] > 0 and row["examples_per_s"] == pytest.approx(
            small["batch"] / (row["step_ms"] / 1e3), rel=0.01)
        assert row["mfu"] is None  # no peak is known for a CPU
    f32, bf16 = s["attention"]["rows"]
    assert (f32["dtype"], bf16["dtype"]) == ("float32", "bfloat16")
    assert f32["max_abs_difference"] < 1e-5  # float32: fused = the explicit softmax
    assert bf16["max_abs_difference"] < 0.1  # bfloat16 rounding of the same computation
    for precision in ("highest", "default"):
        worst = s["parity"][precision]
        assert worst["top-4 ids differ"] == 0
        assert max(worst.values()) <= 1e-5  # the CPU computes float32 at either precision
    assert s["search"]["top1_agrees_with_numpy"] and s["search"]["queries_per_s"] > 0
    assert s["rerank"]["pairs_per_s"] > 0
    pipe = s["pipeline"]
    assert pipe["train_step_examples_per_s"] == s["train"]["bfloat16"]["examples_per_s"]
    assert pipe["pipeline_over_step"] == pytest.approx(
        pipe["examples_per_s"] / pipe["train_step_examples_per_s"], rel=0.01)
    text = (out / "accelerator.md").read_text()
    for title in ("Train step", "Attention", "Parity", "Exact search", "Re-ranker",
                  "Input pipeline", "Seconds per section"):
        assert title in text


def test_a_failing_section_is_reported_and_the_others_still_run(monkeypatch, tmp_path):
    def broken(p):
        raise RuntimeError("no such device feature")
    monkeypatch.setattr(accelerator, "train_section", broken)
    monkeypatch.setattr(accelerator, "parity_section", lambda workdir: {"highest": {"x": 0.0}})
    report = accelerator.run("small", str(tmp_path))
    assert report["sections"]["train"]["error"] == "RuntimeError: no such device feature"
    assert "error" not in report["sections"]["search"]
    assert report["sections"]["pipeline"]["pipeline_over_step"] is None  # no step to compare
    assert "**train**: failed: `RuntimeError: no such device feature`" in accelerator.markdown(
        report)
