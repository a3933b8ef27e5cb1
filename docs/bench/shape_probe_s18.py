"""Can an image tower learn, under direct supervision, which (colour, shape) objects a scenes
picture holds? The diagnostic behind BENCHMARKS.md's "What the pixel towers miss: shapes"
(issue 19, session 18): the pixel towers' caption-true recall is lost on captions that name
shapes, so this asks whether the tower learns shapes at all when told them.

    .venv/bin/python docs/bench/shape_probe_s18.py RUN [--steps 400] [--tower vit|cnn]
        [--patch 16] [--stem patch|conv|cnn] [--stem-channels 32,64,128]
        [--pool avg|max|map|tok] [--width 128] [--init-range 0.02]
        [--layers 2] [--lr 1e-3] [--labels classes|shapes]

RUN: a scenes towers run (its data is read: the stored 64 × 64 pictures). The tower (the
pixel demo's ViT, or a small CNN: four 3 × 3 convolutions with LayerNorm and GELU) maps a
picture to 36 logits, one per (shape, colour), trained with a sigmoid cross-entropy on which
classes are present (labels "classes"), or on which shapes are (labels "shapes": the colour
outputs of a shape share its label), batch 256 from 20,000 training pictures, AdamW with a
warm-up and cosine decay. Reported on 1,000 val pictures, each image's n true classes /
colours / shapes against its n best scores (1.0: all right; for shapes, random scores get
0.36 and the shapes' frequencies, the same for every image, 0.39): classes, colours (max over
shapes), shapes (max over colours), and shapes on the images whose objects are all large
(~20 px) and on the others.
"""

from __future__ import annotations

import argparse
import time
from types import SimpleNamespace

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ldot_jax.core import workdir as workdir_lib
from ldot_jax.data import scenes, scenes_truth
from ldot_jax.models.config import POOLS, STEMS, PixelConfig, TransformerConfig
from ldot_jax.models.vit import ViTTower
from ldot_jax.retrieval import index_build

SHAPES, COLORS = len(scenes.SHAPES), len(scenes.COLORS)


def load(dataset, split: str, n: int):
    """(pixels uint8[n, S, S, 3], present f32[n, SHAPES · COLORS], all_large bool[n])."""
    records = dataset.split(split)
    pixels = np.stack([records[i]["image"] for i in range(n)])
    objects = scenes_truth.split_objects(dataset.settings, split, n)
    present = np.zeros((n, SHAPES * COLORS), np.float32)
    for i, scene in enumerate(objects):
        for obj in scene:
            present[i, obj.class_id - 1] = 1  # class_id - 1 = shape · COLORS + colour
    large = np.array([all(o.size == "large" for o in scene) for scene in objects])
    return pixels, present, large


class CNN(nn.Module):
    """A small convolutional baseline: 32 → 64 → 128 → 128 channels, strides 2, 2, 2, 1."""

    @nn.compact
    def __call__(self, image):
        x = (image["pixels"].astype(jnp.float32) / 255 - 0.45) / 0.27
        for channels, stride in ((32, 2), (64, 2), (128, 2), (128, 1)):
            x = nn.gelu(nn.LayerNorm()(nn.Conv(channels, (3, 3), strides=stride)(x)))
        return SimpleNamespace(embedding=nn.Dense(SHAPES * COLORS)(x.mean((1, 2))))


def top_n(scores: np.ndarray, truth: np.ndarray) -> float:
    """Mean over images of the share of its n true labels among its n best scores."""
    shares = [t[np.argsort(-s, kind="stable")[:int(t.sum())]].mean()
              for s, t in zip(scores, truth) if t.any()]
    return round(float(np.mean(shares)), 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--tower", choices=("vit", "cnn"), default="vit")
    parser.add_argument("--patch", type=int, default=16)
    parser.add_argument("--stem", choices=STEMS, default="patch")
    parser.add_argument("--pool", choices=POOLS, default="avg")
    parser.add_argument("--stem-channels", default="",
                        help="comma-separated channels of the conv / cnn stem (empty: default)")
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--init-range", type=float, default=0.02,
                        help="the ViT's dense and embedding init std (the scenes towers: 0.1)")
    parser.add_argument("--labels", choices=("classes", "shapes"), default="classes")
    args = parser.parse_args()
    dataset = index_build.open_dataset(workdir_lib.load_config(args.run))
    train_x, train_y, _ = load(dataset, "train", 20000)
    val_x, val_y, val_large = load(dataset, "val", 1000)
    if args.tower == "cnn":
        model = CNN()
    else:
        width = args.width
        channels = tuple(int(c) for c in args.stem_channels.split(",") if c)
        model = ViTTower(TransformerConfig(
            hidden_size=width, num_layers=args.layers, num_heads=4, intermediate_size=4 * width,
            hidden_dropout=0.0, attention_dropout=0.0, vocab_size=1, max_position_embeddings=1,
            initializer_range=args.init_range),
            PixelConfig(image_size=train_x.shape[1], patch_size=args.patch, pool=args.pool,
                        stem=args.stem, stem_channels=channels), project_dim=SHAPES * COLORS)
    params = model.init(jax.random.key(0), {"pixels": jnp.asarray(train_x[:2])})["params"]
    optimizer = optax.adamw(optax.warmup_cosine_decay_schedule(0, args.lr, 30, args.steps),
                            weight_decay=0.0)
    state = optimizer.init(params)

    def targets(y):
        if args.labels == "shapes":  # each shape's presence, on all its colour outputs
            y = y.reshape(-1, SHAPES, COLORS).max(2, keepdims=True)
            y = jnp.broadcast_to(y, (len(y), SHAPES, COLORS)).reshape(-1, SHAPES * COLORS)
        return y

    def loss_fn(p, x, y):
        logits = model.apply({"params": p}, {"pixels": x}).embedding
        return optax.sigmoid_binary_cross_entropy(logits, targets(y)).mean()

    @jax.jit
    def step(p, s, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(p, x, y)
        updates, s = optimizer.update(grads, s, p)
        return optax.apply_updates(p, updates), s, loss

    def evaluate(p) -> dict:
        logits = np.asarray(model.apply({"params": p}, {"pixels": jnp.asarray(val_x)}).embedding)
        scores = logits.reshape(-1, SHAPES, COLORS)
        truth = val_y.reshape(-1, SHAPES, COLORS) > 0
        shapes = scores.mean(2) if args.labels == "shapes" else scores.max(2)
        return {"classes": top_n(logits, val_y > 0),
                "colours": top_n(scores.max(1), truth.any(1)),
                "shapes": top_n(shapes, truth.any(2)),
                "shapes_large": top_n(shapes[val_large], truth.any(2)[val_large]),
                "shapes_other": top_n(shapes[~val_large], truth.any(2)[~val_large])}

    rng = np.random.default_rng(0)
    start = time.perf_counter()
    for i in range(args.steps):
        rows = rng.integers(0, len(train_x), 256)
        params, state, loss = step(params, state, jnp.asarray(train_x[rows]),
                                   jnp.asarray(train_y[rows]))
        if (i + 1) % max(1, args.steps // 4) == 0:
            print({"step": i + 1, "loss": round(float(loss), 4), **evaluate(params),
                   "s": round(time.perf_counter() - start)}, flush=True)


if __name__ == "__main__":
    main()
