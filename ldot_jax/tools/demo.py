"""`make demo`: LightningDOT end to end on the built-in scenes data, then the table.

  0. the scenes dataset (TFDS array_record, generated on first use, about a minute), a picture;
  1. faithfulness: the shipped parity checkpoints (LightningDOT bi-encoder and UNITER ITM,
     written by the ORIGINAL PyTorch code) converted and compared with the original outputs;
  2. pre-training with VMLM, SMRM (MRFR + MRC-kl) and CMR   (ldot_jax/configs/demo.py:pretrain);
  3. fine-tuning with CMR (+ the Matryoshka prefix)           (ldot_jax/configs/demo.py:finetune);
  4. the re-ranker: UNITER ITM with hard negatives            (ldot_jax/configs/demo.py:rerank);
  5. extraction and the ScaNN indexes of the test split       (ldot index build);
  6. the two-stage evaluation: dot, coarse-to-fine, + re-rank at M ∈ {10, 20, 50, 100}, the
     fused score with α chosen on val, ms per query and the speed-up over scoring all pairs
     with the cross-encoder (ldot evaluate) → one table and a
     recall-versus-latency plot.
A stage whose result exists in the workdir is reused (delete it to redo it). `--tiny` runs
the same on a 48-image dataset with tiny models (the test's seconds-long version).

`--pixels` runs the pixel system instead (ldot_jax/configs/demo_pixels.py): a ViT image tower
and a text tower trained from scratch on the scenes' pictures (64 × 64), the patch re-ranker
over its own ViT's patch tokens, the indexes and the same two-stage evaluation, with the
caption-true recall the scenes generator can judge.
"""

from __future__ import annotations

import argparse
import logging
import os
import pathlib
import sys
import time

import jax
import numpy as np

from ldot_jax.checkpoints import convert, pretrained
from ldot_jax.configs import demo as demo_configs
from ldot_jax.configs import demo_pixels as demo_pixels_configs
from ldot_jax.core import workdir as workdir_lib
from ldot_jax.data import datasets, preview
from ldot_jax.data.batching import prefix_mask
from ldot_jax.evaluation import report as report_lib
from ldot_jax.evaluation import two_stage
from ldot_jax.retrieval import index_build
from ldot_jax.training import train

# Written by the original PyTorch code (tests/data/README.md); package data.
FIXTURES = pathlib.Path(__file__).resolve().parent / "parity_fixtures"
HEADS = 4  # the parity models: hidden 32, 4 heads


def parity_check(workdir: str, fixtures: pathlib.Path = FIXTURES) -> dict[str, float]:
    """Step 1: converts the original PyTorch checkpoints and returns the worst absolute
    differences of our outputs to the original's."""
    io = dict(np.load(fixtures / "ldot_small_io.npz"))
    models = os.path.join(workdir, "models")
    dual_dir = convert.convert_checkpoint("lightningdot", fixtures / "ldot_small_weights.npz",
                                          os.path.join(models, "lightningdot"), HEADS)
    cross_dir = convert.convert_checkpoint("uniter_itm", fixtures / "uniter_small_weights.npz",
                                           os.path.join(models, "uniter_itm"), HEADS)
    dual, dual_params = pretrained.load_dual_encoder(dual_dir)
    # The original's inputs as our towers' input pytrees.
    text = dual.apply({"params": dual_params}, {"input_ids": io["in_txt_input_ids"],
                                                "attention_mask": io["in_txt_attention_mask"]},
                      method=dual.encode_text)
    image = dual.apply({"params": dual_params}, {"region_feat": io["in_img_feat"],
                                                 "boxes": io["in_img_pos_feat"],
                                                 "region_mask": io["in_img_attention_mask"][:, 1:]},
                       method=dual.encode_image)
    scores = np.asarray(text @ image.T)
    _, top_ids = jax.lax.top_k(scores, 4)
    cross, cross_params = pretrained.load_cross_encoder(cross_dir)
    u = dict(np.load(fixtures / "uniter_small_io.npz"))
    rank = cross.apply(
        {"params": cross_params},
        {"input_ids": u["in_input_ids"],
         "attention_mask": prefix_mask(u["in_txt_lens"], u["in_input_ids"].shape[1])},
        {"region_feat": u["in_img_feat"], "boxes": u["in_img_pos_feat"],
         "region_mask": prefix_mask(u["in_num_bbs"], u["in_img_feat"].shape[1])},
        method=cross.score)
    return {
        "text vectors": float(np.abs(np.asarray(text) - io["out_txt_pooled"]).max()),
        "image vectors": float(np.abs(np.asarray(image) - io["out_img_pooled"]).max()),
        "score matrix": float(np.abs(scores - io["out_scores_txt_img"]).max()),
        "top-4 ids differ": float(not np.array_equal(top_ids, io["out_faiss_t2i_ids"])),
        "cross-encoder rank scores": float(np.abs(np.asarray(rank)
                                                  - u["out_rank_scores"][:, 0]).max()),
    }


# Per system: its config module, its training stages (stage, what it does), the run whose
# towers are the fast stage, and where each stage is initialized from ({stage: {config key:
# the run whose model it reads}}).
SYSTEMS = {
    "regions": dict(
        configs=demo_configs, fast="finetune",
        stages=(("pretrain", "pre-training: VMLM + MRFR + MRC-kl + CMR"),
                ("finetune", "fine-tuning: CMR + Matryoshka prefix"),
                ("rerank", "the re-ranker: UNITER ITM + rank hinge, hard negatives from the "
                           "fine-tuned towers")),
        wiring={"finetune": {"init.model": "pretrain"},
                "rerank": {"init.model": "pretrain", "itm.dual": "finetune"}}),
    "pixels": dict(
        configs=demo_pixels_configs, fast="towers",
        stages=(("towers", "ViT + text towers from scratch on the pictures: CMR + "
                           "Matryoshka prefix"),
                ("rerank", "the patch re-ranker: UNITER single stream over the caption and "
                           "its ViT's patch tokens, hard negatives from the towers")),
        wiring={"rerank": {"init.model": "towers", "itm.dual": "towers"}}),
}


def stage_config(stage: str, workdir: str, data_dir: str, tiny: bool,
                 system: str = "regions"):
    """ldot_jax/configs/demo.py:<stage>[,tiny] (demo_pixels.py for the pixel system) wired to
    the previous stages' outputs."""
    spec = SYSTEMS[system]
    config = spec["configs"].get_config(stage + (",tiny" if tiny else ""))
    config.data.data_dir = data_dir
    config.train.progress_bar = sys.stderr.isatty()
    for key, source in spec["wiring"].get(stage, {}).items():
        section, field = key.split(".")
        config[section][field] = os.path.join(workdir, source, workdir_lib.MODEL_DIR)
    return config


def _train(stage: str, workdir: str, data_dir: str, tiny: bool, system: str = "regions") -> str:
    run_dir = os.path.join(workdir, stage)
    model_dir = os.path.join(run_dir, workdir_lib.MODEL_DIR)
    if os.path.isfile(os.path.join(model_dir, "ldot_config.json")):
        print(f"      reusing {model_dir}")
        return run_dir
    start = time.perf_counter()
    summary = train.train_and_evaluate(stage_config(stage, workdir, data_dir, tiny, system),
                                       run_dir)
    shown = {k: round(v, 3) for k, v in summary["train"].items()
             if k.endswith(("_loss", "accuracy")) or k == "steps_per_sec"}
    print(f"      {summary['step']} steps in {time.perf_counter() - start:.0f} s: {shown}")
    if summary["eval"]:
        print("      val: " + ", ".join(f"{k} {v:.1f}" for k, v in summary["eval"].items()))
    return run_dir


def run(workdir: str, data_dir: str | None = None, tiny: bool = False,
        fixtures: pathlib.Path = FIXTURES, pixels: bool = False) -> dict:
    """Runs the demo (the region system, or with `pixels` the pixel system); returns
    {"parity": worst differences (the region system's; {} for pixels), "report":
    report_lib.Report, "paths": what the evaluation wrote, "seconds": per step}."""
    system = "pixels" if pixels else "regions"
    spec = SYSTEMS[system]
    steps = len(spec["stages"]) + (4 if not pixels else 3)
    workdir = os.path.abspath(workdir)
    data_dir = data_dir or os.path.join(os.path.dirname(workdir), "data")
    os.makedirs(workdir, exist_ok=True)
    seconds, clock = {}, time.perf_counter()

    def lap(name):
        nonlocal clock
        now = time.perf_counter()
        seconds[name] = round(now - clock, 1)
        clock = now

    print(f"[0/{steps - 1}] scenes dataset in {data_dir} (generated on first use, then "
          f"reused)")
    config = stage_config(spec["fast"], workdir, data_dir, tiny, system)
    dataset = datasets.load_for_run(config.data)
    print("      " + ", ".join(f"{k} {len(v)}" for k, v in sorted(dataset.splits.items()))
          + f" images; {dataset.spec.feat_dim}-d regions, {dataset.spec.image_size}² "
            f"pictures")
    test = dataset.split("test")
    print(f"      test image 0: {test[0]['captions'][0].decode()!r}")
    picture = preview.plot_examples(test, os.path.join(workdir, "scenes.png"))
    if picture:
        print(f"      examples drawn to {picture}")
    lap("data")

    diffs, step = {}, 1
    if not pixels:
        print(f"[1/{steps - 1}] faithfulness: the original PyTorch checkpoints in {fixtures} "
              f"converted")
        diffs = parity_check(workdir, fixtures)
        print("      worst difference to the original outputs: " + ", ".join(
            f"{k} {v:.1e}" for k, v in diffs.items()))
        lap("parity")
        step += 1

    for stage, what in spec["stages"]:
        print(f"[{step}/{steps - 1}] {what}")
        _train(stage, workdir, data_dir, tiny, system)
        lap(stage)
        step += 1

    finetune = os.path.join(workdir, spec["fast"])
    print(f"[{step}/{steps - 1}] extraction and ScaNN indexes of the test split")
    built = index_build.build_from_workdir(finetune, progress=False)
    for side, report in built.health.items():
        print(f"      {side} index: recall vs exact "
              + ", ".join(f"{k} {v:.3f}" for k, v in report.items() if k.startswith("recall")))
    lap("index")

    print(f"[{step + 1}/{steps - 1}] two-stage evaluation of the test split")
    options = demo_configs.EVAL_TINY if tiny else demo_configs.EVAL
    report, paths = two_stage.evaluate_workdir(
        finetune, os.path.join(workdir, "rerank", workdir_lib.MODEL_DIR), "test",
        progress=sys.stderr.isatty(), out_dir=os.path.join(workdir, "eval"), **options)
    lap("evaluate")
    print(report_lib.table(report))
    print(f"      written: {', '.join(paths.values())}")
    print("      time per step (s): " + ", ".join(f"{k} {v}" for k, v in seconds.items())
          + f"; total {sum(seconds.values()):.0f} s")
    return {"parity": diffs, "report": report, "paths": paths, "seconds": seconds}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ldot demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="runs/demo")
    parser.add_argument("--data_dir", default=None,
                        help="where datasets live (default: data/ beside the workdir)")
    parser.add_argument("--tiny", action="store_true", help="a tiny run (what the test runs)")
    parser.add_argument("--pixels", action="store_true",
                        help="the pixel system: ViT towers and the patch re-ranker on the "
                             "scenes' pictures (default workdir runs/demo_pixels)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.ERROR)
    workdir = args.workdir
    if args.pixels and workdir == parser.get_default("workdir"):
        workdir = "runs/demo_pixels"
    result = run(workdir, args.data_dir, args.tiny, pixels=args.pixels)
    worst = max(result["parity"].values(), default=0.0)
    if worst > 1e-5:
        print(f"parity FAILED: worst difference {worst:.2e} > 1e-5", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
