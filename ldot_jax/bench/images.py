"""Image benchmark: decoding pictures in the input pipeline, or once at preparation?

    ldot bench images [--count 512] [--width 500 --height 375] [--size 224] [--workers 0]

Writes `count` procedural JPEGs of width × height (Flickr30k's typical 500 × 375) to a
temporary directory, then measures, in images per second:
  decode     data/images.load_pixels (decode, resize the shorter side bicubic, centre crop)
             in this process: what one input-pipeline thread does per picture;
  prepare    a JSONL dataset prepared from them (image_size=size, feat_dim=0: decoding in
             `workers` processes, writing array_record);
  read       the prepared records read back and collated into {"pixels": uint8[B, S, S, 3]}
             batches (what training does with stored pictures);
  vit step   a jitted forward + backward of a ViT-B/32-sized image tower with the in-batch
             contrastive loss on those batches (batch 32, this machine's CPU).
The pipeline keeps up when its rate exceeds the step's; on an accelerator the step is
hundreds of times faster than on a CPU, so what decides is the read rate against the
decode rate per core.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

import numpy as np

from ldot_jax.core import fileutil


def _write_pictures(root: str, count: int, width: int, height: int) -> list[str]:
    from PIL import Image

    folder = os.path.join(root, "images")
    os.makedirs(folder)
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:height, 0:width]
    lines = []
    for i in range(count):
        base = np.stack([x * 255 / width, y * 255 / height, np.full(x.shape, 60.0 + i % 128)],
                        axis=-1)
        noisy = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(noisy).save(os.path.join(folder, f"p{i:05d}.jpg"), quality=90)
        lines.append(json.dumps({"image_id": f"p{i:05d}", "caption": f"picture {i}"}))
    with open(os.path.join(root, "train.jsonl"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return [os.path.join(folder, f"p{i:05d}.jpg") for i in range(count)]


def _vit_step_rate(size: int, steps: int, batch: int = 32) -> float:
    import jax
    import jax.numpy as jnp

    from ldot_jax.checkpoints.pretrained import build_model, init_params
    from ldot_jax.models.config import DualEncoderConfig, PixelConfig, TransformerConfig
    from ldot_jax.training import losses

    vit = TransformerConfig(vocab_size=1, hidden_size=768, num_layers=12, num_heads=12,
                            intermediate_size=3072, max_position_embeddings=1,
                            activation="quick_gelu")
    text = TransformerConfig(vocab_size=1000, hidden_size=128, num_layers=1, num_heads=2,
                             intermediate_size=256, max_position_embeddings=16)
    config = DualEncoderConfig(text=text, image=vit, project_dim=512, image_tower="vit",
                               pixels=PixelConfig(size, 32), normalize_embeddings=True)
    model = build_model("lightningdot", config)
    params = init_params("lightningdot", config, jax.random.key(0))
    ids = jnp.ones((batch, 16), jnp.int32)

    def loss_fn(p, pixels):
        image = model.apply({"params": p}, {"pixels": pixels}, method=model.encode_image)
        words = model.apply({"params": p}, {"input_ids": ids, "attention_mask": ids},
                            method=model.encode_text)
        return losses.reference_contrastive_loss(words, image)

    step = jax.jit(jax.value_and_grad(loss_fn))
    pixels = jnp.zeros((batch, size, size, 3), jnp.uint8)
    jax.block_until_ready(step(params, pixels))
    start = time.perf_counter()
    for _ in range(steps):
        jax.block_until_ready(step(params, pixels))
    return steps * batch / (time.perf_counter() - start)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="ldot bench images")
    parser.add_argument("--count", type=int, default=512)
    parser.add_argument("--width", type=int, default=500)
    parser.add_argument("--height", type=int, default=375)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--workers", type=int, default=0, help="0: one per CPU")
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--vit_steps", type=int, default=3, help="0: no ViT step")
    parser.add_argument("--output", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)

    from ldot_jax.data import batching, datasets, images

    out = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
           "count": args.count, "picture": [args.width, args.height], "size": args.size}
    with tempfile.TemporaryDirectory() as root:
        files = _write_pictures(root, args.count, args.width, args.height)
        start = time.perf_counter()
        for path in files:
            images.load_pixels(path, args.size)
        out["decode_per_core"] = args.count / (time.perf_counter() - start)
        start = time.perf_counter()
        data = datasets.load("jsonl", data_dir=os.path.join(root, "data"), manual_dir=root,
                             feat_dim=0, image_size=args.size, workers=args.workers)
        out["prepare"] = args.count / (time.perf_counter() - start)
        records = data.split("train")
        start = time.perf_counter()
        for first in range(0, args.count, args.batch_size):
            rows = range(first, min(first + args.batch_size, args.count))
            batching.collate_pixels([batching.image_input("pixels").from_record(records[i])
                                     for i in rows], batch_size=args.batch_size)
        out["read"] = args.count / (time.perf_counter() - start)
        out["stored_bytes_per_image"] = args.size * args.size * 3
    if args.vit_steps:
        out["vit_b32_step_cpu"] = _vit_step_rate(args.size, args.vit_steps)
    print(json.dumps(out, indent=1))
    if args.output:
        fileutil.atomic_write_text(args.output, json.dumps(out, indent=1))
    return 0
