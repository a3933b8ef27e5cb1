"""The built wheel works on its own: `pip wheel` of the package, installed into a fresh venv
outside the checkout, then `ldot --help` and `ldot demo --tiny` run there from an empty
directory, as a separate process on one device (the way `make demo` starts it): parity with
the original outputs, the three training stages, the indexes and the two-stage table with
its plot (this is also the demo's end-to-end test). This catches what the editable install hides: package data missing from the wheel
(the parity fixtures, the configs) and paths computed relative to the repository.

The fresh venv gets no copies of jax, flax, ...: a `.pth` line puts the outer venv's
site-packages on its path. A plain path line is used (not `site.addsitedir`), so the outer
venv's own `.pth` files, among them the editable install's `__editable__*` finder, are not
run and `ldot_jax` can only come from the wheel. The venv is made without
`--system-site-packages`: for a venv created from a venv that would add the base
interpreter's site-packages, which the outer venv itself does not see."""

import json
import os
import pathlib
import shutil
import subprocess
import sys
import sysconfig
import zipfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
# What the wheel is built from (copied: an in-tree build would write build/ and *.egg-info).
SOURCES = ("ldot_jax", "setup.cfg", "setup.py", "pyproject.toml", "README.md", "MANIFEST.in",
           "LICENSE", "NOTICE")
ARTIFACTS = ("build", "dist")  # what a build in the repository would leave there
COMMANDS = ("train", "convert", "export", "index", "serve", "export-serving", "evaluate",
            "mine", "demo", "launch", "bench")


def _run(args, **kwargs):
    done = subprocess.run([str(a) for a in args], capture_output=True, text=True, **kwargs)
    assert done.returncode == 0, (f"{args}\n" + done.stdout[-3000:] + done.stderr[-3000:])
    return done


def _artifacts():
    """The build outputs in the repository root and their modification times."""
    return {p.name: p.stat().st_mtime_ns for p in ROOT.iterdir()
            if p.name in ARTIFACTS or p.name.endswith((".egg-info", ".whl"))}


def _build_wheel(tmp_path: pathlib.Path) -> pathlib.Path:
    src = tmp_path / "src"
    src.mkdir()
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
        elif path.is_file():
            shutil.copy2(path, src / name)
    wheels = tmp_path / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
          "--no-index", "--no-cache-dir", "-w", wheels, src], timeout=600)
    (wheel,) = wheels.glob("ldot_jax-*.whl")
    return wheel


def _make_venv(tmp_path: pathlib.Path) -> pathlib.Path:
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], timeout=300)
    python = venv / "bin" / "python"
    site = pathlib.Path(_run([python, "-c", "import sysconfig; "
                              "print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    assert site.is_relative_to(venv), site
    outer = sysconfig.get_paths()["purelib"]
    (site / "_outer_venv.pth").write_text(outer + "\n")
    return venv


def test_wheel_installs_and_runs_the_demo(tmp_path):
    before = _artifacts()
    wheel = _build_wheel(tmp_path)
    names = set(zipfile.ZipFile(wheel).namelist())
    for fixture in ("ldot_small_io.npz", "ldot_small_weights.npz", "uniter_small_io.npz",
                    "uniter_small_weights.npz", "ldot_small_pretrain_weights.npz"):
        assert f"ldot_jax/tools/parity_fixtures/{fixture}" in names
    assert "ldot_jax/configs/demo.py" in names and "ldot_jax/configs/demo_pixels.py" in names
    assert "ldot_jax/data/vocab/bpe_simple_vocab_16e6.txt.gz" in names
    assert "ldot_jax/tools/serving/page.html" in names

    venv = _make_venv(tmp_path)
    python = venv / "bin" / "python"
    env = {k: v for k, v in os.environ.items()
           if k not in ("XLA_FLAGS", "PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env["JAX_PLATFORMS"] = "cpu"
    # One device, as `make demo` runs; the suite's compile-time flags (conftest.py) are kept.
    env["XLA_FLAGS"] = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split()
                                if not f.startswith("--xla_force_host_platform_device_count"))
    # Before the install the venv must not see the checkout's editable ldot_jax.
    absent = subprocess.run([python, "-c", "import ldot_jax"], capture_output=True, text=True,
                            env=env, cwd=tmp_path)
    assert absent.returncode != 0 and "No module named 'ldot_jax'" in absent.stderr, (
        absent.stdout + absent.stderr)
    # --ignore-installed: the outer venv's ldot_jax metadata is visible; never uninstall it.
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index",
          "--no-cache-dir", "--ignore-installed", wheel], env=env, timeout=600)

    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    where = _run([python, "-c", "import ldot_jax, sys; print(ldot_jax.__file__)"],
                 env=env, cwd=cwd).stdout.strip()
    site = pathlib.Path(_run([python, "-c", "import sysconfig; "
                              "print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    assert pathlib.Path(where).resolve().is_relative_to(site.resolve()), where
    assert not pathlib.Path(where).resolve().is_relative_to(ROOT), where

    ldot = venv / "bin" / "ldot"
    assert ldot.is_file()
    helped = _run([ldot, "--help"], env=env, cwd=cwd, timeout=120).stdout
    for command in COMMANDS:
        assert f"ldot {command}" in helped
    # The service's page is read from the installed package.
    page = _run([python, "-c", "from ldot_jax.tools.serving import app; "
                 "print(app.PAGE); print(open(app.PAGE).read(200))"], env=env, cwd=cwd).stdout
    path = pathlib.Path(page.splitlines()[0]).resolve()
    assert path.is_relative_to(site.resolve()) and "ldot_jax search" in page, page

    workdir = tmp_path / "demo"
    done = subprocess.run([str(ldot), "demo", "--tiny", "--workdir", str(workdir),
                           "--data_dir", str(tmp_path / "data")],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    for step in range(7):
        assert f"[{step}/6]" in out
    # The parity fixtures were read from the installed package, not the checkout.
    assert str(site.resolve() / "ldot_jax" / "tools" / "parity_fixtures") in out
    assert "top-4 ids differ 0.0e+00" in out
    assert "| + re-rank | 20 |" in out and "all pairs (cross-encoder)" in out
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
    recall = {"ir_r1", "ir_r5", "ir_r10", "tr_r1", "tr_r5", "tr_r10", "ar"}
    for row in report["rows"]:  # the scenes can tell which captions are true: ct_* too
        assert set(row["metrics"]) == recall | {"ct_" + m for m in recall}
        assert all(row["metrics"]["ct_" + m] >= row["metrics"][m] for m in recall)
        assert row["ms"]["t2i"] > 0 and row["speedup"]["t2i"] > 0
    assert report["all_pairs"]["label"].startswith("extrapolated from")
    assert (workdir / "eval" / "recall_latency.png").stat().st_size > 1000
    for stage in ("pretrain", "finetune", "rerank"):
        assert (workdir / stage / "model" / "ldot_config.json").exists()
    assert (workdir / "finetune" / "index" / "test" / "image" / "index.json").exists()

    # The pixel system: ViT towers, the patch re-ranker, the same evaluation.
    pixels = tmp_path / "demo_pixels"
    done = subprocess.run([str(ldot), "demo", "--pixels", "--tiny", "--workdir", str(pixels),
                           "--data_dir", str(tmp_path / "data")],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for step in range(5):
        assert f"[{step}/4]" in done.stdout
    assert "| + re-rank | 20 |" in done.stdout and "CT IR R@1" in done.stdout
    report = json.loads((pixels / "eval" / "report.json").read_text())
    assert [r["stage"] for r in report["rows"]][:3] == ["dot", "coarse-to-fine", "+ re-rank"]
    assert all("ct_ar" in r["metrics"] for r in report["rows"])
    for stage in ("towers", "rerank"):
        assert (pixels / stage / "model" / "ldot_config.json").exists()
    assert not any(cwd.iterdir()), list(cwd.iterdir())  # the demos wrote only to their workdirs

    assert _artifacts() == before  # nothing built in the repository
