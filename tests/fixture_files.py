"""Writers of small files in the formats users have (for reader tests): UNITER LMDB databases
with msgpack-numpy / compressed-npz / lz4 values, Karpathy JSON, Multi30K text files, the JSONL
custom format and per-image .npz region files. Values are random but seeded."""

from __future__ import annotations

import gzip
import io
import json
import os

import lmdb
import lz4.frame
import msgpack
import numpy as np

FEAT_DIM = 16


def regions(rng, n, feat_dim=FEAT_DIM, classes=0):
    x1, y1 = rng.uniform(0, 0.5, (2, n))
    w, h = rng.uniform(0.1, 0.5, (2, n))
    out = {"features": rng.normal(size=(n, feat_dim)).astype(np.float16),
           "norm_bb": np.stack([x1, y1, x1 + w, y1 + h, w, h], 1).astype(np.float16),
           "conf": rng.uniform(0, 1, n).astype(np.float16)}
    if classes:
        p = rng.uniform(size=(n, classes))
        out["soft_labels"] = (p / p.sum(1, keepdims=True)).astype(np.float16)
    return out


def msgpack_numpy(array: np.ndarray) -> dict:
    """The map msgpack_numpy.encode writes for an ndarray (binary keys)."""
    return {b"nd": True, b"type": array.dtype.str, b"kind": b"", b"shape": list(array.shape),
            b"data": array.tobytes()}


def write_img_db(path, images: dict, nbb: dict, compressed=False):
    """images: {name: regions dict}; nbb: {name: kept count}."""
    os.makedirs(path, exist_ok=True)
    sub = "feat_th0.2_max100_min10" + ("_compressed" if compressed else "")
    env = lmdb.open(os.path.join(path, sub), map_size=1 << 26)
    with env.begin(write=True) as txn:
        for name, arrays in images.items():
            if compressed:
                buffer = io.BytesIO()
                np.savez_compressed(buffer, **arrays)
                value = buffer.getvalue()
            else:
                value = msgpack.packb({k: msgpack_numpy(v) for k, v in arrays.items()},
                                      use_bin_type=True)
            txn.put(name.encode(), value)
        txn.put(b"__keys__", json.dumps(list(images)).encode())
    env.close()
    with open(os.path.join(path, "nbb_th0.2_max100_min10.json"), "w") as f:
        json.dump(nbb, f)


def write_txt_db(path, texts: list[tuple[str, str, list[int], str]], meta=None):
    """texts: [(text id, image name, input_ids, raw caption)] in dataset order."""
    os.makedirs(path, exist_ok=True)
    env = lmdb.open(path, map_size=1 << 24)
    with env.begin(write=True) as txn:
        for text_id, image, ids, raw in texts:
            value = {"input_ids": ids, "img_fname": image, "raw": raw, "tokens": [],
                     "toked_caption": [], "imgid": 0, "sentid": 0, "image_id": 0}
            txn.put(text_id.encode(), lz4.frame.compress(msgpack.packb(value,
                                                                       use_bin_type=True)))
    env.close()
    img2txts = {}
    for text_id, image, _, _ in texts:
        img2txts.setdefault(image, []).append(text_id)
    files = {"id2len.json": {t: len(ids) for t, _, ids, _ in texts},
             "txt2img.json": {t: image for t, image, _, _ in texts},
             "img2txts.json": img2txts,
             "meta.json": meta or {"bert": "bert-base-cased", "UNK": 100, "CLS": 101,
                                   "SEP": 102, "MASK": 103, "v_range": [106, 28996]}}
    for name, content in files.items():
        with open(os.path.join(path, name), "w") as f:
            json.dump(content, f)


def write_region_npz(features_dir, stem, rng, n=None, feat_dim=FEAT_DIM, classes=0):
    os.makedirs(features_dir, exist_ok=True)
    r = regions(rng, n or int(rng.integers(2, 6)), feat_dim, classes)
    arrays = {"features": r["features"], "boxes": r["norm_bb"][:, :4].astype(np.float32)}
    if classes:
        arrays["soft_labels"] = r["soft_labels"]
    np.savez(os.path.join(features_dir, stem + ".npz"), **arrays)
    return arrays


def write_karpathy(root, name, layout: dict[str, int], captions=5, seed=0):
    """layout: {split: image count}; files dataset_<name>.json and features/."""
    rng = np.random.default_rng(seed)
    images, n = [], 0
    for split, count in layout.items():
        for _ in range(count):
            filename = f"{n:010d}.jpg"
            images.append({"filename": filename, "imgid": n, "split": split,
                           "sentids": list(range(n * captions, (n + 1) * captions)),
                           "sentences": [{"raw": f"A photo number {n} caption {k}.",
                                          "tokens": [], "imgid": n, "sentid": n * captions + k}
                                         for k in range(captions)]})
            write_region_npz(os.path.join(root, "features"), f"{n:010d}", rng)
            n += 1
    with open(os.path.join(root, f"dataset_{name}.json"), "w") as f:
        json.dump({"images": images, "dataset": name}, f)
    return images


def write_multi30k(root, sizes: dict[str, int], seed=0):
    """Repository layout: image_splits/, task1/raw/{split}.{de,fr} (gzipped for val), task2
    (German, five captions), features/."""
    rng = np.random.default_rng(seed)
    files = {"train": "train", "val": "val", "test": "test_2016_flickr"}
    for d in ("image_splits", "task1/raw", "task2/raw"):
        os.makedirs(os.path.join(root, d), exist_ok=True)
    n = 0
    for split, count in sizes.items():
        names = [f"{1000 + n + i}.jpg" for i in range(count)]
        n += count
        for name in names:
            write_region_npz(os.path.join(root, "features"), name[:-4], rng)
        with open(os.path.join(root, "image_splits", f"{files[split]}.txt"), "w") as f:
            f.write("\n".join(names) + "\n")
        for lang, word in (("de", "Ein Hund läuft über die Straße"),
                           ("fr", "Un chien court dans la rue")):
            text = "".join(f"{word} {i}\n" for i in range(count))
            path = os.path.join(root, "task1", "raw", f"{files[split]}.{lang}")
            if split == "val":
                with gzip.open(path + ".gz", "wt", encoding="utf-8") as f:
                    f.write(text)
            else:
                with open(path, "w", encoding="utf-8") as f:
                    f.write(text)
        for k in range(1, 6):
            with open(os.path.join(root, "task2", "raw", f"{files[split]}.{k}.de"), "w",
                      encoding="utf-8") as f:
                f.write("".join(f"Beschreibung {k} von Bild {i}\n" for i in range(count)))


def write_jsonl(root, split, items: list[dict], seed=0):
    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, f"{split}.jsonl"), "w") as f:
        for item in items:
            f.write(json.dumps(item) + "\n")
    for image_id in dict.fromkeys(item["image_id"] for item in items):
        if not os.path.exists(os.path.join(root, "features", image_id + ".npz")):
            write_region_npz(os.path.join(root, "features"), image_id, rng)
