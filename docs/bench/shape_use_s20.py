"""Do a scenes towers run's vectors carry shape? The diagnostic behind BENCHMARKS.md's "More
steps and mined negatives teach the pixel towers some shape" (issue 19, session 20).

    .venv/bin/python docs/bench/shape_use_s20.py RUN [--split val]

RUN: a scenes towers run (its model directory and data). Every image and caption of the split
goes through the towers (as the training evaluation embeds them), then:
  image probe   a ridge regression (2-fold, even / odd images) from the image vectors to
                which of the 36 (shape, colour) classes the picture holds, scored as
                docs/bench/shape_probe_s18.py scores (each image's n true classes among its n
                best; for shapes, the shapes' frequencies alone get 0.39);
  text probe    the same from the vectors of the captions that name one object ("a red
                circle in the scene") to that object's class: the share whose best class,
                colour and shape are right (shape by chance: 1/6);
  retrieval     for those captions, the share whose top-1 image holds an object of the named
                colour, of the named shape, and of both (caption-true);
  cosines       their mean cosine to the images holding the named class, and to the images
                holding the named colour on other shapes only.
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json

import jax
import numpy as np

from ldot_jax.checkpoints import pretrained
from ldot_jax.core import parallel
from ldot_jax.core import workdir as workdir_lib
from ldot_jax.data import scenes, scenes_truth
from ldot_jax.retrieval import extract, index_build
# The probe's scoring and sizes (a sibling script: Python puts this directory on the path).
from shape_probe_s18 import COLORS, SHAPES, top_n


def ridge_2fold(x: np.ndarray, y: np.ndarray, lam: float = 1e-2) -> np.ndarray:
    """Predictions f[N, K] of y f[N, K] from x f[N, D]: each half fitted on the other."""
    out = np.zeros(y.shape)
    for fold in range(2):
        test = np.arange(len(x)) % 2 == fold
        a = np.c_[x[~test], np.ones((~test).sum())]
        w = np.linalg.solve(a.T @ a + lam * np.eye(a.shape[1]), a.T @ y[~test])
        out[test] = np.c_[x[test], np.ones(test.sum())] @ w
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run")
    parser.add_argument("--split", default="val")
    args = parser.parse_args()
    config = workdir_lib.load_config(args.run)
    loaded = pretrained.load_pretrained(f"{args.run}/{workdir_lib.MODEL_DIR}")
    mesh = parallel.make_mesh()
    model = pretrained.build_model(loaded.kind, loaded.config)
    params = parallel.replicate(jax.device_get(loaded.params), mesh)
    dataset = index_build.open_dataset(config)
    table = dataset.caption_table(args.split)
    captions = extract.eval_captions(table, dataset.tokenizer, args.split, config)
    images, texts, _ = extract.embed_split(model, params, dataset.split(args.split), captions,
                                           config, mesh)
    images = images / np.linalg.norm(images, axis=1, keepdims=True)
    texts = texts / np.linalg.norm(texts, axis=1, keepdims=True)
    objects = scenes_truth.split_objects(dataset.settings, args.split, len(images))
    present = np.zeros((len(images), SHAPES * COLORS))
    for i, scene in enumerate(objects):
        for obj in scene:
            present[i, obj.class_id - 1] = 1  # shape · COLORS + colour
    guess = ridge_2fold(images, present).reshape(-1, SHAPES, COLORS)
    grid = present.reshape(-1, SHAPES, COLORS)
    report = {"image_probe": {"classes": top_n(guess.reshape(len(images), -1), present),
                              "colours": top_n(guess.max(1), grid.max(1)),
                              "shapes": top_n(guess.max(2), grid.max(2))}}

    words = [c for record in table for c in record["captions"]]
    if len(words) != len(texts):
        raise RuntimeError(f"{len(words)} caption texts for {len(texts)} caption vectors")
    parsed = [(t, scenes_truth.parse(c)) for t, c in enumerate(words)]
    named = [(t, p.partial) for t, p in parsed if p.kind == "partial"]
    rows = np.array([t for t, _ in named])
    color = np.array([list(scenes.COLORS).index(p.color) for _, p in named])
    shape = np.array([scenes.SHAPES.index(p.shape) for _, p in named])
    best = ridge_2fold(texts[rows], np.eye(SHAPES * COLORS)[shape * COLORS + color]).argmax(1)
    report["text_probe"] = {"class": round(float((best == shape * COLORS + color).mean()), 3),
                            "colour": round(float((best % COLORS == color).mean()), 3),
                            "shape": round(float((best // COLORS == shape).mean()), 3)}
    scores = texts[rows] @ images.T
    top = scores.argmax(1)

    def share(test) -> float:
        return round(float(np.mean([any(test(o, p) for o in objects[j])
                                    for (_, p), j in zip(named, top)])), 3)

    report["retrieval_top1"] = {
        "colour": share(lambda o, p: o.color == p.color),
        "shape": share(lambda o, p: o.shape == p.shape),
        "both": share(lambda o, p: o.color == p.color and o.shape == p.shape)}
    has_class = grid[:, shape, color].T > 0  # [captions, images]
    has_colour = grid[:, :, color].any(1).T
    report["cosine"] = {
        "named_class": round(float(scores[has_class].mean()), 3),
        "colour_only": round(float(scores[has_colour & ~has_class].mean()), 3)}
    report["captions"] = len(rows)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
