"""UNITER / LightningDOT feature databases (LMDB), and their conversion to the project format.

img_db directory: an LMDB sub-directory `feat_th{conf}_max{max}_min{min}/` (values: msgpack
maps whose arrays are msgpack-numpy maps) or `…_compressed/` (values: np.savez_compressed
bytes), next to `nbb_th{conf}_max{max}_min{min}.json` ({image name: regions kept}). Keys are
image names ("flickr30k_000000123456.npz"); the extra key `__keys__` is skipped. Arrays are
float16: `features` n×2048, `norm_bb` n×6, `conf` n, `soft_labels` n×1601.
txt_db directory: the LMDB itself, with `id2len.json` (its order is the dataset order),
`txt2img.json`, `img2txts.json`, `meta.json`; values are lz4-frame-compressed msgpack maps with
`input_ids` (wordpieces, no [CLS]/[SEP]), `img_fname`, `raw`, ….
Both are opened read-only without locking: users' copies are often on read-only storage.
"""

from __future__ import annotations

import dataclasses
import io
import os

import lmdb
import lz4.frame
import msgpack
import numpy as np

from ldot_jax.core import fileutil
from ldot_jax.data import tokenizer as tokenizer_lib
from ldot_jax.data.builder_base import RecordsBuilder, RecordsConfig

DETECTOR_CLASSES = 1601


def compute_num_bb(conf, conf_th: float = 0.2, min_bb: int = 10, max_bb: int = 100) -> int:
    """UNITER's rule for how many regions an image keeps: those with confidence above
    `conf_th`, clipped to [min_bb, max_bb]."""
    return int(min(max_bb, max(min_bb, int((np.asarray(conf) > conf_th).sum()))))


def _open_lmdb(path: str) -> lmdb.Environment:
    if not os.path.isfile(os.path.join(path, "data.mdb")):
        raise FileNotFoundError(f"{path}: no LMDB database here (data.mdb missing)")
    return lmdb.open(path, readonly=True, lock=False, readahead=False, create=False,
                     subdir=True, max_readers=512)


def _msgpack_numpy(obj):
    """object_hook: msgpack-numpy's {b'nd': True, b'type', b'shape', b'data'} → ndarray."""
    if obj.get(b"nd") is True or obj.get("nd") is True:
        get = lambda k: obj[k.encode()] if k.encode() in obj else obj[k]  # noqa: E731
        dtype = get("type")
        dtype = dtype.decode() if isinstance(dtype, bytes) else dtype
        return np.frombuffer(get("data"), np.dtype(dtype)).reshape(get("shape"))
    return obj


class ImageDb:
    """Reads an img_db directory: `db[name]` → {features, norm_bb, conf, soft_labels} as
    float32, truncated to the image's region count from the nbb json."""

    def __init__(self, path: str, conf_th: float = 0.2, max_bb: int = 100, min_bb: int = 10,
                 compressed: bool | None = None):
        self.path = os.fspath(path)
        if not os.path.isdir(self.path):
            raise FileNotFoundError(f"img_db {self.path} does not exist")
        stem = f"th{conf_th}_max{max_bb}_min{min_bb}"
        plain = os.path.join(self.path, f"feat_{stem}")
        packed = plain + "_compressed"
        if compressed is None:
            compressed = not os.path.isdir(plain) and os.path.isdir(packed)
        self.db_path = packed if compressed else plain
        self.compressed = compressed
        self.name_to_nbb = fileutil.read_json(os.path.join(self.path, f"nbb_{stem}.json"))
        self._env = _open_lmdb(self.db_path)

    def names(self) -> list[str]:
        """Image names in the database (without the `__keys__` entry)."""
        with self._env.begin() as txn:
            return [key.decode() for key, _ in txn.cursor() if key != b"__keys__"]

    def __contains__(self, name: str) -> bool:
        with self._env.begin() as txn:
            return txn.get(name.encode()) is not None

    def __getitem__(self, name: str) -> dict[str, np.ndarray]:
        with self._env.begin(buffers=False) as txn:
            value = txn.get(name.encode())
        if value is None:
            raise KeyError(f"{self.db_path}: no image {name!r}")
        try:
            if self.compressed:
                with np.load(io.BytesIO(value), allow_pickle=False) as archive:
                    arrays = {k: archive[k] for k in archive.files}
            else:
                arrays = msgpack.unpackb(value, raw=False, strict_map_key=False,
                                         object_hook=_msgpack_numpy)
                arrays = {(k.decode() if isinstance(k, bytes) else k): v
                          for k, v in arrays.items()}
        except Exception as e:
            raise ValueError(f"{self.db_path}: value of {name!r} cannot be decoded as a "
                             f"{'compressed npz' if self.compressed else 'msgpack-numpy'} "
                             f"record ({type(e).__name__}: {e})") from e
        missing = [k for k in ("features", "norm_bb") if k not in arrays]
        if missing:
            raise ValueError(f"{self.db_path}: record {name!r} lacks {missing} (has "
                             f"{sorted(arrays)})")
        if name not in self.name_to_nbb:
            raise KeyError(f"{self.path}: image {name!r} is missing from the nbb json")
        keep = min(len(arrays["features"]), int(self.name_to_nbb[name]))
        return {k: np.asarray(arrays[k][:keep], np.float32)
                for k in ("features", "norm_bb", "conf", "soft_labels") if k in arrays}


class TextDb:
    """Reads a txt_db directory: `ids` in dataset order, `db[id]` → the decoded example."""

    def __init__(self, path: str):
        self.path = os.fspath(path)
        self.id2len = fileutil.read_json(os.path.join(self.path, "id2len.json"))
        self.txt2img = fileutil.read_json(os.path.join(self.path, "txt2img.json"))
        self.img2txts = fileutil.read_json(os.path.join(self.path, "img2txts.json"))
        self.meta = fileutil.read_json(os.path.join(self.path, "meta.json"))
        self.ids = list(self.id2len)
        self._env = _open_lmdb(self.path)

    def __getitem__(self, text_id: str) -> dict:
        with self._env.begin(buffers=False) as txn:
            value = txn.get(text_id.encode())
        if value is None:
            raise KeyError(f"{self.path}: no text {text_id!r}")
        try:
            example = msgpack.unpackb(lz4.frame.decompress(value), raw=False)
        except Exception as e:
            raise ValueError(f"{self.path}: value of {text_id!r} is not lz4-compressed msgpack "
                             f"({type(e).__name__}: {e})") from e
        if "input_ids" not in example:
            raise ValueError(f"{self.path}: text {text_id!r} lacks 'input_ids' (has "
                             f"{sorted(example)})")
        return example

    def images(self) -> list[str]:
        """Image names in order of their first text (the order of id2len)."""
        return list(dict.fromkeys(self.txt2img[t] for t in self.ids))


@dataclasses.dataclass
class UniterDbConfig(RecordsConfig):
    """Conversion settings: `splits` maps a split name to (txt_db path, img_db path)."""

    splits: dict = dataclasses.field(default_factory=dict)
    text_meta: dict = dataclasses.field(default_factory=dict)  # the txt_dbs' meta.json
    conf_th: float = 0.2
    max_bb: int = 100
    min_bb: int = 10


def uniter_config(name: str, splits: dict, soft_labels: bool = False,
                  feat_dim: int = 2048) -> UniterDbConfig:
    """A config that converts `splits` ({split: (txt_db, img_db)}); with `soft_labels` the
    1601 detector classes are kept (MRC-kl needs them; ~320 KB per image)."""
    splits = {k: tuple(os.path.abspath(p) for p in v) for k, v in splits.items()}
    metas = {txt: fileutil.read_json(os.path.join(txt, "meta.json")) for txt, _ in splits.values()}
    keys = ("CLS", "SEP", "MASK", "UNK", "v_range")
    meta = {}
    for txt, m in metas.items():
        this = {k: m.get(k) for k in keys}
        if meta and this != meta:
            raise ValueError(f"{txt}/meta.json {this} disagrees with another split's {meta}: "
                             f"all txt_dbs must share one vocabulary")
        meta = this
    return UniterDbConfig(name=name, splits=splits, text_meta=meta, feat_dim=feat_dim,
                          num_classes=DETECTOR_CLASSES if soft_labels else 0, pretokenized=True)


def _check_ids(examples: list[dict], text_ids: list[str], meta: dict, txt_path: str) -> None:
    """ValueError naming the text if an input id is negative or past the vocabulary that
    meta.json's v_range ends (bert-base-cased 28996, -uncased 30522: a txt_db of the other
    vocabulary is caught by its first id past the end)."""
    v_range = meta.get("v_range")
    if not v_range:
        return
    vocab = int(v_range[1])
    found = tokenizer_lib.out_of_vocabulary([e["input_ids"] for e in examples], vocab)
    if found:
        i, bad = found
        raise ValueError(f"{txt_path}: text {text_ids[i]!r} has token id {bad} outside the "
                         f"vocabulary [0, {vocab}) of its meta.json (v_range {v_range})")


def _records(config: UniterDbConfig, txt_path: str, img_path: str):
    txt_db = TextDb(txt_path)
    img_db = ImageDb(img_path, config.conf_th, config.max_bb, config.min_bb)
    texts_of: dict[str, list[str]] = {}
    for text_id in txt_db.ids:
        if text_id not in txt_db.txt2img:
            raise ValueError(f"{txt_path}: text {text_id!r} of id2len.json is missing from "
                             f"txt2img.json")
        texts_of.setdefault(txt_db.txt2img[text_id], []).append(text_id)
    for name, text_ids in texts_of.items():
        if name not in img_db:
            raise KeyError(f"{txt_path}: texts {text_ids[:3]} point at image {name!r}, which "
                           f"is not in {img_db.db_path}")
        regions = img_db[name]
        examples = [txt_db[t] for t in text_ids]
        _check_ids(examples, text_ids, config.text_meta, txt_path)
        record = {"image_id": os.path.splitext(name)[0], "region_feat": regions["features"],
                  "boxes": regions["norm_bb"],
                  "captions": [e.get("raw", "") for e in examples],
                  "caption_ids": [e["input_ids"] for e in examples]}
        if config.num_classes:
            if "soft_labels" not in regions:
                raise ValueError(f"{img_db.db_path}: image {name!r} has no soft_labels")
            record["soft_labels"] = regions["soft_labels"]
        yield f"{img_db.db_path}[{name}]", record


class UniterDb(RecordsBuilder):
    """A conversion of UNITER / LightningDOT txt_db + img_db pairs (see `uniter_config`)."""

    name = "ldot_uniter_db"

    def split_records(self, dl_manager):
        config = self.builder_config
        if not config.splits:
            raise ValueError("UniterDb: the config names no splits; build it with "
                             "uniter_config(name, {split: (txt_db, img_db)})")
        return {split: _records(config, txt, img) for split, (txt, img) in
                config.splits.items()}
