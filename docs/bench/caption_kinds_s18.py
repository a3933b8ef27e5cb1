"""What the scenes towers fail at: caption-true IR R@1 per kind of caption, on the first N
images of the train split and of val (issue 19, session 18; BENCHMARKS.md, "What the pixel
towers miss: shapes").

    .venv/bin/python docs/bench/caption_kinds_s18.py RUN [RUN …] [--images 1000]
        [--out docs/bench/caption_kinds_s18.json]

RUN: a towers run's workdir (`ldot train`), region or pixel. The same N images per split, so
train and val numbers compare (train ≈ val: the towers underfit, more data would not help).
Kinds (data/scenes_truth.KINDS): partial (one object named: "a red circle in the scene"),
count (groups with counts), count_all ("two objects colored red and blue": colours only),
relation. The training evaluation writes the same per-kind numbers for the whole val split
(dot_recall: ct_ir_r1_<kind>).
"""

from __future__ import annotations

import argparse
import json

import jax

from ldot_jax.checkpoints import pretrained
from ldot_jax.core import parallel
from ldot_jax.core import workdir as workdir_lib
from ldot_jax.data import scenes_truth
from ldot_jax.evaluation import recall
from ldot_jax.retrieval import extract, index_build


def measure(workdir: str, images: int, mesh) -> dict:
    """{split: metrics} for the first `images` images of train and val (all their captions)."""
    config = workdir_lib.load_config(workdir)
    loaded = pretrained.load_pretrained(workdir_lib.model_dir(workdir))
    model = pretrained.build_model(loaded.kind, loaded.config)
    params = parallel.replicate(jax.device_get(loaded.params), mesh)
    dataset = index_build.open_dataset(config)
    out = {}
    for split in ("train", "val"):
        records = dataset.split(split)
        records = [records[i] for i in range(min(images, len(records)))]
        table = dataset.caption_table(split)[:len(records)]
        captions = extract.eval_captions(table, dataset.tokenizer, split, config)
        image_vectors, text_vectors, caption_image = extract.embed_split(
            model, params, records, captions, config, mesh)
        texts = [c for row in table for c in row["captions"]]
        objects = scenes_truth.split_objects(dataset.settings, split, len(records))
        metrics = recall.retrieval_metrics(
            text_vectors, image_vectors, caption_image,
            truth=scenes_truth.truth(texts, objects), kinds=scenes_truth.kinds(texts),
            kind_names=scenes_truth.KINDS)
        out[split] = {k: round(v, 2) for k, v in metrics.items()}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    mesh = parallel.make_mesh()
    results = {}
    columns = ("ir_r1", "ar", "ct_ir_r1") + tuple(f"ct_ir_r1_{k}" for k in scenes_truth.KINDS)
    print("| run | split | " + " | ".join(columns) + " |")
    for run in args.runs:
        results[run] = measure(run, args.images, mesh)
        for split, metrics in results[run].items():
            print(f"| {run} | {split} | " + " | ".join(str(metrics.get(c, "–"))
                                                      for c in columns) + " |", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"images": args.images, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
