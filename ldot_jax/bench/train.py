"""Training-step benchmark: step time, examples/s and model FLOPs utilization (MFU).

    ldot bench train [--preset lightningdot_base] [--batch_size 8] \
        [--text_len 32] [--regions 36] [--dtype float32|bfloat16] [--task cmr] [--steps 10]
        [--json out.json]

Times the real jitted train step (train.make_train_step: forward, backward, AdamW, the
sharded contrastive loss) of a `lightningdot_pretrain` model over every local device, on
synthetic batches of fixed shapes. FLOPs come from XLA's cost analysis of the compiled step
(so they count what runs, including the backward pass and the optimizer); MFU = FLOPs per
second / the device's peak (a table of dense bf16 / fp32 peaks below; none on CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np

from ldot_jax.core import fileutil


# Dense peak FLOP/s per device (bf16 tensor cores; fp32 without TF32 for float32).
PEAKS = {"H100": {"bfloat16": 989e12, "float32": 67e12},
         "H200": {"bfloat16": 989e12, "float32": 67e12},
         "A100": {"bfloat16": 312e12, "float32": 19.5e12},
         "TPU v4": {"bfloat16": 275e12, "float32": 275e12 / 2},
         "TPU v5": {"bfloat16": 197e12, "float32": 197e12 / 2}}


def peak_flops(device_kind: str, dtype: str) -> float | None:
    for name, peaks in PEAKS.items():
        if name.lower() in device_kind.lower():
            return peaks[dtype]
    return None


def synthetic_batch(rng, batch: int, text_len: int, regions: int, feat_dim: int,
                    vocab: int, classes: int) -> dict:
    lengths = rng.integers(text_len // 2, text_len + 1, batch)
    mask = (np.arange(text_len)[None] < lengths[:, None]).astype(np.int32)
    labels = np.where((rng.random((batch, text_len)) < 0.15) & (mask == 1),
                      rng.integers(5, vocab, (batch, text_len)), -1)
    ids = lambda: (rng.integers(5, vocab, (batch, text_len)) * mask).astype(np.int32)
    return dict(
        text={"input_ids": ids(), "attention_mask": mask},
        image={"region_feat": rng.normal(size=(batch, regions, feat_dim)).astype(np.float32),
               "boxes": rng.random((batch, regions, 7)).astype(np.float32),
               "region_mask": np.ones((batch, regions), np.int32)},
        image_index=np.arange(batch, dtype=np.int32),
        text_index=np.arange(batch, dtype=np.int32), valid=np.ones(batch, bool),
        vmlm_text={"input_ids": ids(), "attention_mask": mask},
        vmlm_labels=labels.astype(np.int32), region_masked=rng.random((batch, regions)) < 0.15,
        soft_labels=np.full((batch, regions, classes), 1.0 / classes, np.float32))


def run(preset: str, batch_size: int, text_len: int, regions: int, dtype: str, task: str,
        steps: int) -> dict:
    import jax

    from ldot_jax.configs import base
    from ldot_jax.training import optim, tasks, train
    from ldot_jax.core import parallel
    from ldot_jax.checkpoints import pretrained

    c = base.base_config(preset, "lightningdot_pretrain")
    c.model.text.dtype = c.model.image.dtype = dtype
    c.tasks = {task: 1}
    kind, model_cfg, model = train.model_and_config(c)
    mesh = parallel.make_mesh()
    parallel.check_global_batch(batch_size, mesh)
    tx, _ = optim.make_optimizer(c.optimizer, 1000, {"model": pretrained.abstract_params(
        kind, model_cfg)})
    setup = tasks.make_setup(model, mesh, c, (task,))
    state = train.init_state(c, kind, model_cfg, tx, mesh, load_pretrained=False)
    frozen = {}  # the benchmarked tasks need no frozen model
    rng = np.random.default_rng(0)
    batch = synthetic_batch(rng, batch_size, text_len, regions, model_cfg.region.feat_dim,
                            model_cfg.text.vocab_size, model_cfg.region.num_classes)
    step = train.make_train_step(task, setup, tx)
    key = jax.random.key(0)
    with jax.set_mesh(mesh):
        global_batch = parallel.global_batch(batch, mesh)
        start = time.perf_counter()
        compiled = step.lower(state, global_batch, key, frozen).compile()
        compile_s = time.perf_counter() - start
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        flops = float(cost.get("flops", 0.0)) if cost else 0.0
        state, metrics = compiled(state, global_batch, key, frozen)  # warm-up
        jax.block_until_ready(metrics)
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            state, metrics = compiled(state, global_batch, key, frozen)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - start)
    step_s = float(np.median(times))
    device = jax.devices()[0]
    # cost_analysis reports one device's program (SPMD): FLOPs per device per step.
    peak = peak_flops(device.device_kind, dtype)
    params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
    return {"preset": preset, "task": task, "dtype": dtype, "global_batch": batch_size,
            "text_len": text_len, "regions": regions, "devices": jax.device_count(),
            "device_kind": device.device_kind, "parameters": params,
            "compile_s": round(compile_s, 2), "step_ms": round(1000 * step_s, 2),
            "step_ms_p90": round(1000 * float(np.percentile(times, 90)), 2),
            "examples_per_s": round(batch_size / step_s, 2),
            "tflops_per_device_step": round(flops / 1e12, 4),
            "achieved_tflops_per_device": round(flops / step_s / 1e12, 3),
            "mfu": round(flops / step_s / peak, 4) if peak else None,
            "loss": float(metrics["loss"]), "machine": platform.processor() or platform.machine(),
            "cpus": os.cpu_count()}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="ldot bench train",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="lightningdot_base")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--text_len", type=int, default=32)
    parser.add_argument("--regions", type=int, default=36)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--task", default="cmr", choices=("cmr", "vmlm", "mrfr", "mrckl"))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--json", default=None, help="also write the result here")
    ns = parser.parse_args(argv)
    result = run(ns.preset, ns.batch_size, ns.text_len, ns.regions, ns.dtype, ns.task, ns.steps)
    text = json.dumps(result, indent=1)
    print(text)
    if ns.json:
        fileutil.atomic_write_text(ns.json, text + "\n")
    return 0
