"""A picture of a dataset: a grid of images with their captions (for the demo and README)."""

from __future__ import annotations

import os
import textwrap
from typing import Sequence

from ldot_jax.data import schema


def plot_examples(images: Sequence[dict], path: str, count: int = 8) -> str | None:
    """Writes a grid of the first `count` records' pictures and captions to `path` (PNG,
    written through a temporary file). Returns the path, or None if matplotlib is absent or
    the records carry no picture."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    records = [images[i] for i in range(min(count, len(images)))]
    if not records or "image" not in records[0]:
        return None
    cols = 4
    rows = -(-len(records) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.6 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, record in zip(axes.ravel(), records):
        ax.imshow(record["image"], interpolation="nearest")
        captions = schema.caption_texts(record)[:3]
        ax.set_title("\n".join(textwrap.shorten(c, 46) for c in captions), fontsize=6.5)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, path)
    return path
