"""`make demo` runs end to end (its `--tiny` version, as a separate process on one device, the
way `make demo` starts it): parity with the original outputs, the three training stages, the
indexes and the two-stage table with its plot."""

import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_demo_runs_end_to_end(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    workdir = tmp_path / "demo"
    done = subprocess.run([sys.executable, "-m", "ldot_jax.demo", "--tiny", "--workdir",
                           str(workdir), "--data_dir", str(tmp_path / "data")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    for step in range(7):
        assert f"[{step}/6]" in out
    assert "top-4 ids differ 0.0e+00" in out
    report = json.loads((workdir / "eval" / "report.json").read_text())
    stages = [(r["stage"], r["m"]) for r in report["rows"]]
    assert stages[:4] == [("dot", None), ("coarse-to-fine", None), ("+ re-rank", 10),
                          ("+ re-rank", 20)]
    assert any(s.startswith("+ fused") for s, _ in stages)
    choice = report["alpha_choice"]
    best = max(choice["ir_r1"].values())  # the smallest α of the best IR R@1 on val
    assert choice["split"] == "val" and report["alpha"] == min(
        float(a) for a, r in choice["ir_r1"].items() if r == best)
    assert "α of the fused rows chosen on val" in out
    for row in report["rows"]:
        assert set(row["metrics"]) == {"ir_r1", "ir_r5", "ir_r10", "tr_r1", "tr_r5", "tr_r10",
                                       "ar"}
        assert row["ms"]["t2i"] > 0 and row["speedup"]["t2i"] > 0
    assert report["all_pairs"]["label"].startswith("extrapolated from")
    assert "| + re-rank | 20 |" in out and "all pairs (cross-encoder)" in out
    assert (workdir / "eval" / "recall_latency.png").stat().st_size > 1000
    for stage in ("pretrain", "finetune", "rerank"):
        assert (workdir / stage / "model" / "ldot_config.json").exists()
    assert (workdir / "finetune" / "index" / "test" / "image" / "index.json").exists()
