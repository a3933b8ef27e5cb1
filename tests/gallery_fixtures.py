"""Shared by tests/test_gallery.py and tests/test_serve.py: a converted open_clip model that
reads real captions, and a gallery of the open_clip fixture's pictures."""

import dataclasses
import json
import pathlib
import shutil

import jax
import numpy as np

from ldot_jax.checkpoints import convert, pretrained

HERE = pathlib.Path(__file__).parent / "data" / "open_clip"
PICTURES = sorted(p.name for p in (HERE / "images").iterdir())


def clip_model(tmp) -> str:
    """The converted open_clip fixture, its text table widened to CLIP's tokenizer: the fixture
    has 1,000 token ids and CLIP's BPE 49,408, so real captions need more rows (random ones);
    the image tower, which embeds the gallery, is the converted one unchanged."""
    with np.load(HERE / "small_clip.npz") as data:
        np.savez(tmp / "clip.npz", **{k[len("state/"):]: data[k] for k in data.files
                                      if k.startswith("state/")})
    converted = convert.convert_checkpoint("open_clip", tmp / "clip.npz", tmp / "converted",
                                           activation="quick_gelu", num_heads=4,
                                           text_num_heads=2)
    loaded = pretrained.load_pretrained(converted)
    tokenizer = pretrained.load_tokenizer(converted)
    rows = tokenizer.vocab_size
    config = dataclasses.replace(loaded.config, text=dataclasses.replace(
        loaded.config.text, vocab_size=rows))
    rng = np.random.default_rng(0)

    def widen(leaf):
        leaf = np.asarray(leaf)
        if leaf.shape[:1] != (loaded.config.text.vocab_size,) or leaf.ndim != 2:
            return leaf
        extra = rng.normal(0, 0.02, (rows - leaf.shape[0], leaf.shape[1]))
        return np.concatenate([leaf, extra.astype(leaf.dtype)])
    params = dict(loaded.params)
    params["text_tower"] = jax.tree.map(widen, params["text_tower"])
    return str(pretrained.save_pretrained(tmp / "model", loaded.kind, config, params,
                                          tokenizer=tokenizer))


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def pictures(root):
    """(root, gallery.jsonl, its rows): the fixture's nine pictures under root/photos, with
    fields and, for the first five, two captions each."""
    shutil.copytree(HERE / "images", root / "photos")
    rows = [{"id": f"p{i}", "image": f"photos/{name}", "name": f"picture {name}",
             "source": "flickr" if i % 2 else "coco", "tags": ["even" if i % 2 == 0 else "odd",
                                                              f"t{i % 3}"],
             "year": 2000 + i % 4, **({"captions": [f"caption {i}", f"another {i}"]}
                                      if i < 5 else {})}
            for i, name in enumerate(PICTURES)]
    return root, write_jsonl(root / "gallery.jsonl", rows), rows


WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "blue", "circle", "square",
         "left", "of"]


def random_model(path, stage: str, seed: int):
    """(model directory, model config) of the demo's `stage` (tiny) with random weights."""
    from ldot_jax.configs import demo
    from ldot_jax.training import train
    kind, model_cfg, _ = train.model_and_config(demo.get_config(f"{stage},tiny"))
    params = pretrained.init_params(kind, model_cfg, jax.random.key(seed))
    return pretrained.save_pretrained(path, kind, model_cfg, params), model_cfg


def vocab(path) -> str:
    """A WordPiece vocab.txt of the few words the region tests' captions use."""
    path.write_text("\n".join(WORDS) + "\n")
    return str(path)
