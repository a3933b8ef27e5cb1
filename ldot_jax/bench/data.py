"""Data benchmark: examples/s of the training pipeline against a CPU training step.

    ldot bench data [--data_dir runs/data] [--batch_size 128] [--steps 50]

Reports: scenes generation or reuse time, caption indexing time, pipeline throughput
(tokenized, shuffled, bucket-padded, VMLM/SMRM-masked batches), and the throughput of a jitted
forward + backward step of the `scenes` dual encoder with the in-batch contrastive loss on the
same batches. The pipeline is not the bottleneck when its rate exceeds the step's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np

from ldot_jax.core import fileutil



def _pipeline_rate(dataset, steps: int, warmup: int = 3) -> tuple[float, list]:
    it = iter(dataset)
    batches = [next(it) for _ in range(warmup)]
    start = time.perf_counter()
    for _ in range(steps):
        batches.append(next(it))
    seconds = time.perf_counter() - start
    return steps * len(batches[0]["valid"]) / seconds, batches


def _step_rate(batches, steps: int) -> float:
    import jax
    import jax.numpy as jnp

    from ldot_jax.configs import models as presets
    from ldot_jax.training import losses
    from ldot_jax.checkpoints.kinds import model_config
    from ldot_jax.checkpoints.pretrained import build_model, init_params

    preset = presets.get_config("scenes")
    config = model_config(preset.kind, preset.model)
    model = build_model(preset.kind, config)
    params = init_params(preset.kind, config, jax.random.key(0))

    def loss_fn(params, batch):
        text = model.apply({"params": params}, batch["text"], method=model.encode_text)
        image = model.apply({"params": params}, batch["image"], method=model.encode_image)
        return losses.reference_contrastive_loss(text, image)

    step = jax.jit(jax.value_and_grad(loss_fn))
    inputs = [jax.tree.map(jnp.asarray, {k: b[k] for k in ("text", "image")}) for b in batches]
    shapes = {}
    for batch in inputs:  # compile every bucket shape first
        shape = tuple(x.shape for x in jax.tree.leaves(batch))
        if shape not in shapes:
            shapes[shape] = jax.block_until_ready(step(params, batch))
    start = time.perf_counter()
    for i in range(steps):
        jax.block_until_ready(step(params, inputs[i % len(inputs)]))
    return steps * len(batches[0]["valid"]) / (time.perf_counter() - start)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="ldot bench data")
    parser.add_argument("--data_dir", default="runs/data")
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--train_steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)

    from ldot_jax.data import datasets, pipeline

    start = time.perf_counter()
    data = datasets.load("scenes", data_dir=args.data_dir)
    prepare_s = time.perf_counter() - start
    config = pipeline.PipelineConfig(batch_size=args.batch_size, num_threads=args.threads)
    start = time.perf_counter()
    captions = pipeline.tokenize_captions(data.caption_table("train"), data.tokenizer,
                                          config.max_text_len, config.length_policy,
                                          "train")
    tokenize_s = time.perf_counter() - start
    rate, batches = _pipeline_rate(
        pipeline.training_dataset(data.split("train"), captions, data.tokenizer, config),
        args.steps)
    step_rate = _step_rate(batches, args.train_steps)
    results = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}",
        "dataset": f"scenes train {len(data.split('train'))} images, {len(captions)} captions",
        "prepare_or_reuse_s": round(prepare_s, 2), "tokenize_captions_s": round(tokenize_s, 2),
        "batch_size": args.batch_size, "pipeline_threads": args.threads,
        "pipeline_examples_per_s": round(rate, 1),
        "train_step_examples_per_s": round(step_rate, 1),
        "pipeline_over_step": round(rate / step_rate, 2),
        "bucket_shapes_seen": sorted({tuple(x.shape[1] for x in (
            b["text"]["input_ids"], b["image"]["region_feat"])) for b in batches}),
    }
    print(json.dumps(results, indent=2, default=lambda x: np.asarray(x).tolist()))
    if args.output:
        fileutil.atomic_write_text(args.output, json.dumps(
            results, indent=2, default=lambda x: np.asarray(x).tolist()))
    return 0
