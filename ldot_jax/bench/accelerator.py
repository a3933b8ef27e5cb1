"""One accelerator check: everything an accelerator must show, in one command and one report.

    ldot bench accelerator [--out runs/accelerator] [--small]

Sections (each one timed; a section that fails records its error and the others still run):
  train       the real jitted train step (bench/train.py) of the base towers (CMR) in bfloat16
              and float32: step time, examples/s, XLA FLOPs, MFU against the device's peak;
  attention   the text tower with attention_impl="fused" (jax.nn.dot_product_attention; on
              GPUs cuDNN flash attention where the inputs are 16-bit) against "xla" (the
              original's explicit softmax), in float32 and bfloat16: speed and the largest
              difference of the outputs;
  parity      the converted LightningDOT and UNITER fixtures against the original code's
              outputs at precision="highest" and at the default matmul precision (on GPUs the
              default lets XLA use TF32 / bf16 passes: how far that moves the outputs);
  search      exact top-10 search (ExactIndex, jitted) of 1M × 768 vectors: queries/s;
  rerank      the cross-encoder re-ranker scoring caption × candidate pairs: pairs/s;
  pipeline    one host's input pipeline (grain, synthetic records of the base towers' input
              shapes) against the train step's examples/s: below 1 the host cannot feed its
              accelerators.
Writes accelerator.json and accelerator.md to --out. `--small` runs the same sections at toy
sizes (a CPU check in seconds: what the tests run).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
import traceback

import numpy as np

from ldot_jax.core import fileutil

# (train preset, its batch, cross preset, search corpus, search dim, queries, pairs, pipeline
# batches) per profile.
PROFILES = {
    "full": dict(preset="lightningdot_base", batch=256, text_len=32, regions=36, steps=20,
                 cross="uniter_base", corpus=1_000_000, dim=768, queries=1_000,
                 rerank_queries=8, candidates=100, pipeline_batches=20, attention_batch=64),
    "small": dict(preset="tiny", batch=16, text_len=16, regions=8, steps=3,
                  cross="tiny_uniter", corpus=4_096, dim=64, queries=64,
                  rerank_queries=2, candidates=8, pipeline_batches=4, attention_batch=8),
}

# The [CLS] id of the cross-encoder presets' vocabularies (bert-base-cased 101; the generated
# scenes / tiny vocabularies 2).
CROSS_CLS_ID = {"uniter_base": 101, "tiny_uniter": 2, "scenes_uniter": 2,
                "scenes_small_uniter": 2}


def _timed(fn, repeat: int) -> float:
    """Median seconds of `fn()` over `repeat` calls, after one warm-up call."""
    import jax
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def train_section(p: dict) -> dict:
    from ldot_jax.bench import train as train_bench
    return {dtype: train_bench.run(p["preset"], p["batch"], p["text_len"], p["regions"], dtype,
                                   "cmr", p["steps"])
            for dtype in ("bfloat16", "float32")}


def _text_batch(rng, batch: int, length: int, vocab: int, cls_id: int) -> dict:
    lengths = rng.integers(length // 2, length + 1, batch)
    mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)
    ids = (rng.integers(5, vocab, (batch, length)) * mask).astype(np.int32)
    ids[:, 0] = cls_id
    return {"input_ids": ids, "attention_mask": mask}


def attention_section(p: dict) -> dict:
    """The text tower's forward with attention_impl "fused" against "xla", in float32 and in
    bfloat16 (cuDNN's flash attention, which `jax.nn.dot_product_attention` uses on GPUs,
    needs 16-bit inputs: the bfloat16 row is the one that can use it)."""
    import dataclasses

    import jax

    from ldot_jax.checkpoints import kinds, pretrained
    from ldot_jax.configs import models
    preset = models.get_config(p["preset"])
    config = kinds.model_config(preset.kind, preset.model)
    params = pretrained.init_params(preset.kind, config, jax.random.key(0))
    length = min(64, config.text.max_position_embeddings)
    text = _text_batch(np.random.default_rng(0), p["attention_batch"], length,
                       config.text.vocab_size, config.cls_token_id)
    rows = []
    for dtype in ("float32", "bfloat16"):
        out = {}
        for impl in ("xla", "fused"):
            tower = dataclasses.replace(config.text, attention_impl=impl, dtype=dtype)
            model = pretrained.build_model(preset.kind, dataclasses.replace(config, text=tower))
            encode = jax.jit(lambda prm, t, m=model: m.apply({"params": prm}, t,
                                                             method=m.encode_text))
            seconds = _timed(lambda: encode(params, text), max(3, p["steps"]))
            out[impl] = (1e3 * seconds, np.asarray(encode(params, text), np.float32))
        rows.append({"dtype": dtype, "batch": p["attention_batch"], "text_len": length,
                     "xla_ms": round(out["xla"][0], 3), "fused_ms": round(out["fused"][0], 3),
                     "fused_speedup": round(out["xla"][0] / out["fused"][0], 3),
                     "max_abs_difference": float(np.abs(out["fused"][1]
                                                        - out["xla"][1]).max())})
    return {"rows": rows}


def parity_section(workdir: str) -> dict:
    import jax

    from ldot_jax.tools import demo
    out = {}
    for precision in ("highest", "default"):
        with jax.default_matmul_precision(precision):
            out[precision] = demo.parity_check(os.path.join(workdir, f"parity-{precision}"))
    return out


def search_section(p: dict) -> dict:
    from ldot_jax.index.exact import ExactIndex
    rng = np.random.default_rng(0)
    corpus = rng.standard_normal((p["corpus"], p["dim"]), dtype=np.float32)
    queries = corpus[rng.integers(0, p["corpus"], p["queries"])] + 0.1 * rng.standard_normal(
        (p["queries"], p["dim"]), dtype=np.float32)
    index = ExactIndex(p["dim"]).add(corpus, np.arange(p["corpus"]))
    seconds = _timed(lambda: index.search(queries, 10).ids, 3)
    probe = queries[:8]
    want = np.argmax(probe @ corpus.T, axis=1)
    got = index.search(probe, 1).ids[:, 0]
    return {"corpus": p["corpus"], "dim": p["dim"], "queries": p["queries"], "k": 10,
            "seconds": round(seconds, 4), "queries_per_s": round(p["queries"] / seconds, 1),
            "top1_agrees_with_numpy": bool(np.array_equal(got, want))}


def rerank_section(p: dict) -> dict:
    import jax

    from ldot_jax.checkpoints import kinds, pretrained
    from ldot_jax.configs import models
    from ldot_jax.core import parallel
    from ldot_jax.retrieval import rerank
    preset = models.get_config(p["cross"])
    config = kinds.model_config(preset.kind, preset.model)
    model = pretrained.build_model(preset.kind, config)
    params = pretrained.init_params(preset.kind, config, jax.random.key(0))
    rng = np.random.default_rng(0)
    n, regions, feat = 512, p["regions"], config.region.feat_dim
    store = rerank.ImageStore({
        "region_feat": rng.standard_normal((n, regions, feat), dtype=np.float32),
        "boxes": rng.uniform(size=(n, regions, 7)).astype(np.float32),
        "region_mask": np.ones((n, regions), np.int32)})
    reranker = rerank.CrossEncoderReranker(model, params, store, mesh=parallel.make_mesh(),
                                           text_buckets=(p["text_len"],))
    text = _text_batch(rng, p["rerank_queries"], p["text_len"],
                       config.transformer.vocab_size, CROSS_CLS_ID.get(p["cross"], 101))
    candidates = rng.integers(0, n, (p["rerank_queries"], p["candidates"]))
    zeros = np.zeros(candidates.shape, np.float32)
    seconds = _timed(lambda: reranker("text_to_image", text, candidates, zeros), 3)
    return {"preset": p["cross"], "queries": p["rerank_queries"],
            "candidates": p["candidates"], "regions": regions, "seconds": round(seconds, 4),
            "pairs_per_s": round(candidates.size / seconds, 1)}


def _synthetic_records(rng, count: int, regions: int, feat_dim: int, classes: int) -> list:
    words = ["a", "man", "dog", "red", "car", "on", "the", "street", "with", "two", "people"]
    records = []
    for i in range(count):
        n = int(rng.integers(regions // 2, regions + 1))
        corners = np.sort(rng.uniform(size=(n, 2, 2)), axis=1)
        wh = corners[:, 1] - corners[:, 0]
        boxes = np.concatenate([corners[:, 0], corners[:, 1], wh, wh[:, :1] * wh[:, 1:]], 1)
        records.append({
            "image_id": f"synthetic_{i:06d}",
            "region_feat": rng.standard_normal((n, feat_dim)).astype(np.float16),
            "boxes": boxes.astype(np.float32),
            "soft_labels": np.full((n, classes), 1.0 / classes, np.float16),
            "captions": [" ".join(rng.choice(words, int(rng.integers(6, 14))))
                         for _ in range(5)]})
    return records


def pipeline_section(p: dict, step_examples_per_s: float | None) -> dict:
    from ldot_jax.checkpoints import kinds
    from ldot_jax.configs import models
    from ldot_jax.data import pipeline
    from ldot_jax.data.tokenizer import Tokenizer
    preset = models.get_config(p["preset"])
    config = kinds.model_config(preset.kind, preset.model)
    rng = np.random.default_rng(0)
    count = max(4 * p["batch"], 256)
    records = _synthetic_records(rng, count, p["regions"], config.region.feat_dim,
                                 max(1, config.region.num_classes))
    tokenizer = Tokenizer.from_words((c for r in records for c in r["captions"]), 200)
    captions = pipeline.tokenize_captions(records, tokenizer, p["text_len"] - 2, "truncate")
    cfg = pipeline.PipelineConfig(batch_size=p["batch"], num_threads=os.cpu_count() or 1,
                                  text_buckets=(p["text_len"],),
                                  max_text_len=p["text_len"] - 2, length_policy="truncate",
                                  region_buckets=(p["regions"],))
    it = iter(pipeline.training_dataset(records, captions, tokenizer, cfg))
    next(it)  # warm-up: threads started
    start = time.perf_counter()
    for _ in range(p["pipeline_batches"]):
        next(it)
    rate = p["pipeline_batches"] * p["batch"] / (time.perf_counter() - start)
    return {"batch": p["batch"], "threads": cfg.num_threads, "regions": p["regions"],
            "feat_dim": config.region.feat_dim, "examples_per_s": round(rate, 1),
            "train_step_examples_per_s": step_examples_per_s,
            "pipeline_over_step": (round(rate / step_examples_per_s, 2)
                                   if step_examples_per_s else None)}


def _section(report: dict, name: str, fn) -> None:
    start = time.perf_counter()
    print(f"[accelerator] {name} …", flush=True)
    try:
        report["sections"][name] = fn()
    except Exception as e:  # recorded: the other sections still run
        report["sections"][name] = {"error": f"{type(e).__name__}: {e}",
                                    "traceback": traceback.format_exc()[-4000:]}
    report["seconds"][name] = round(time.perf_counter() - start, 1)


def run(profile: str = "full", workdir: str = "runs/accelerator") -> dict:
    """Runs every section at `profile`'s sizes; returns the report (see `markdown`)."""
    import jax
    p = PROFILES[profile]
    device = jax.devices()[0]
    report = {"profile": profile, "device_kind": device.device_kind,
              "platform": device.platform, "devices": jax.device_count(),
              "jax": jax.__version__, "host": f"{platform.machine()}, {os.cpu_count()} CPUs",
              "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "sections": {}, "seconds": {}}
    _section(report, "train", lambda: train_section(p))
    _section(report, "attention", lambda: attention_section(p))
    _section(report, "parity", lambda: parity_section(workdir))
    _section(report, "search", lambda: search_section(p))
    _section(report, "rerank", lambda: rerank_section(p))
    step = report["sections"]["train"].get("bfloat16", {}).get("examples_per_s")
    _section(report, "pipeline", lambda: pipeline_section(p, step))
    return report


def _cell(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int) or abs(value) >= 1e4:
        return f"{value:,.0f}"
    return f"{value:.3g}" if value and abs(value) < 1e-2 else f"{value:,.4g}"


def markdown(report: dict) -> str:
    """The report as Markdown: one table per section (errors shown in place)."""
    s = report["sections"]
    lines = [f"Device: {report['devices']} × {report['device_kind']} ({report['platform']}), "
             f"jax {report['jax']}, host {report['host']}; profile {report['profile']}; "
             f"{report['time']}.", ""]

    def table(title, rows, keys):
        lines.extend([f"**{title}**", "", "| " + " | ".join(keys) + " |",
                      "|" + "---|" * len(keys)])
        lines.extend("| " + " | ".join(_cell(r.get(k)) for k in keys) + " |" for r in rows)
        lines.append("")

    for name, section in s.items():
        if "error" in section:
            lines.extend([f"**{name}**: failed: `{section['error'][:300]}`", ""])
    if "error" not in s.get("train", {"error": 1}):
        table("Train step (CMR)", [dict(v, dtype=k) for k, v in s["train"].items()],
              ["preset", "dtype", "global_batch", "step_ms", "examples_per_s",
               "tflops_per_device_step", "achieved_tflops_per_device", "mfu", "compile_s"])
    if "error" not in s.get("attention", {"error": 1}):
        table("Attention: fused against xla (text tower forward)", s["attention"]["rows"],
              ["dtype", "batch", "text_len", "xla_ms", "fused_ms", "fused_speedup",
               "max_abs_difference"])
    if "error" not in s.get("parity", {"error": 1}):
        keys = list(next(iter(s["parity"].values())))
        table("Parity with the original outputs (largest absolute difference)",
              [dict(v, precision=k) for k, v in s["parity"].items()], ["precision"] + keys)
    if "error" not in s.get("search", {"error": 1}):
        table("Exact search", [s["search"]],
              ["corpus", "dim", "queries", "k", "queries_per_s", "top1_agrees_with_numpy"])
    if "error" not in s.get("rerank", {"error": 1}):
        table("Re-ranker", [s["rerank"]],
              ["preset", "queries", "candidates", "regions", "pairs_per_s"])
    if "error" not in s.get("pipeline", {"error": 1}):
        table("Input pipeline (one host) against the bf16 train step", [s["pipeline"]],
              ["batch", "threads", "regions", "feat_dim", "examples_per_s",
               "train_step_examples_per_s", "pipeline_over_step"])
    lines.append("Seconds per section: " + ", ".join(f"{k} {v}" for k, v in
                                                       report["seconds"].items()))
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="ldot bench accelerator",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/accelerator")
    parser.add_argument("--small", action="store_true", help="toy sizes (a CPU check)")
    args = parser.parse_args(argv)
    report = run("small" if args.small else "full", args.out)
    os.makedirs(args.out, exist_ok=True)
    fileutil.atomic_write_text(os.path.join(args.out, "accelerator.json"),
                               json.dumps(report, indent=1, default=float))
    text = markdown(report)
    fileutil.atomic_write_text(os.path.join(args.out, "accelerator.md"), text)
    print(text)
    failed = [k for k, v in report["sections"].items() if "error" in v]
    if failed:
        print(f"[accelerator] failed sections: {', '.join(failed)}")
    return 1 if failed else 0
