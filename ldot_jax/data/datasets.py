"""Opening datasets: by registered name (generated or converted on first use, reused after) or
from a prepared directory. `load` returns the splits as random-access sources of records
(see data/schema.py) and the text vocabulary that goes with them.

    data = load("scenes", data_dir="runs/data")                       # built-in, no download
    data = load("karpathy", config="flickr30k", manual_dir="~/flickr30k", vocab="vocab.txt")
    data = load("runs/data/ldot_uniter_db/coco/1.0.0", vocab="bert-base-cased-vocab.txt")
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
from typing import Mapping, Sequence

import numpy as np
import tensorflow_datasets as tfds
import tqdm

from ldot_jax.core import fileutil, paths
from ldot_jax.data import builder_base, scenes_truth, schema, tfds_spill
from ldot_jax.data.jsonl import Jsonl
from ldot_jax.data.karpathy import Karpathy
from ldot_jax.data.multi30k import Multi30k
from ldot_jax.data.scenes_builder import Scenes, ensure_vocabulary, has_vocabulary
from ldot_jax.data.tokenizer import Tokenizer
from ldot_jax.data.uniter_db import UniterDb

log = logging.getLogger(__name__)

BUILDERS = {"scenes": Scenes, "karpathy": Karpathy, "multi30k": Multi30k, "jsonl": Jsonl,
            "uniter_db": UniterDb}
DEFAULT_DATA_DIR = os.environ.get("LDOT_DATA_DIR", os.path.expanduser("~/ldot_jax_data"))


class PretokenizedText:
    """The special ids of a dataset stored as wordpiece ids (UNITER's txt_db meta.json), for
    pipelines that need [CLS] / [SEP] / [MASK] and the random-token range but no vocabulary."""

    def __init__(self, meta: Mapping):
        self.pad_id = 0
        self.cls_id, self.sep_id, self.mask_id, self.unk_id = (
            int(meta[k]) for k in ("CLS", "SEP", "MASK", "UNK"))
        self.random_token_range = tuple(int(v) for v in meta["v_range"])
        self.vocab_size = self.random_token_range[1]

    def encode_batch(self, texts, max_length=None, policy="truncate"):
        raise ValueError("this dataset is pre-tokenized and has no vocabulary: load it with "
                         "vocab=<the vocab.txt its ids come from> to encode new text")


@dataclasses.dataclass(frozen=True)
class RetrievalDataset:
    """A prepared dataset. `splits[name][i]` is record i of a split (a dict, see schema)."""

    name: str
    directory: str
    spec: schema.RecordSpec
    splits: Mapping[str, Sequence[dict]]
    tokenizer: Tokenizer | PretokenizedText | None
    # The builder config's settings stored with the data (builder_base.RecordsConfig).
    settings: Mapping = dataclasses.field(default_factory=dict)

    def caption_truth(self, name: str) -> np.ndarray | None:
        """bool[T, N]: whether caption t of the split (caption_table order) is true of image
        n, for data that can tell (the generated scenes: data/scenes_truth.py); else None."""
        if self.name != Scenes.name:
            return None
        table = self.caption_table(name)
        objects = scenes_truth.split_objects(self.settings, name, len(table))
        return scenes_truth.truth(self._captions(table), objects)

    def caption_kinds(self, name: str) -> np.ndarray | None:
        """str[T]: what caption t of the split asks for (scenes_truth.KINDS: one object, a
        count, a count by colour, a relation), for the generated scenes; else None."""
        if self.name != Scenes.name:
            return None
        return scenes_truth.kinds(self._captions(self.caption_table(name)))

    @staticmethod
    def _captions(table: Sequence[dict]) -> list[str]:
        """Every caption of a caption table, in caption_table order (caption t)."""
        return [c for row in table for c in row["captions"]]

    def split(self, name: str) -> Sequence[dict]:
        if name not in self.splits:
            raise KeyError(f"dataset {self.name} has no split {name!r} (splits: "
                           f"{sorted(self.splits)})")
        return self.splits[name]

    def caption_table(self, name: str) -> list[dict]:
        """Per image of a split: {"captions": [str], "num_regions": int (datasets with
        regions)} (plus "caption_ids" / "caption_lengths" when pre-tokenized), what
        `pipeline.tokenize_captions` needs, without the regions or pictures.
        Reading a whole split decodes every record, so the table is cached next to the data
        (`captions_<split>.json`; skipped if the directory is read-only). The cache records
        the data files it was read from (names, sizes, modification times) and is used only
        while they are unchanged and it has one row per image; otherwise it is rebuilt."""
        path = os.path.join(self.directory, f"captions_{name}.json")
        source = files_signature(self.directory)
        cached = _read_caption_cache(path, source, len(self.split(name)))
        if cached is not None:
            return cached
        images = self.split(name)
        table = []
        for i in tqdm.trange(len(images), desc=f"reading {name} captions", unit="image",
                             leave=False, mininterval=2.0):
            record = images[i]
            row = {"captions": schema.caption_texts(record)}
            if "region_feat" in record:
                row["num_regions"] = len(record["region_feat"])
            if "caption_ids" in record:
                row["caption_ids"] = np.asarray(record["caption_ids"]).tolist()
                row["caption_lengths"] = np.asarray(record["caption_lengths"]).tolist()
            table.append(row)
        try:
            fileutil.atomic_write_text(path, json.dumps({"source": source, "rows": table}))
        except OSError as e:
            log.info("caption table not cached (%s)", e)
        return table


def files_signature(directory: str) -> str:
    """SHA-256 hex of a prepared dataset's files (relative names, sizes, modification times;
    re-prepared data differs), leaving out our caches and hidden temporaries. A local copy of
    a dataset on an object store (`load` with a gs:// data_dir) has the files' SHA-256 in its
    manifest: those are used, so every copy of the same data has the same signature."""
    manifest = fileutil.read_manifest(directory)
    if manifest is not None:
        return hashlib.sha256(json.dumps(manifest["files"], sort_keys=True).encode()).hexdigest()
    h = hashlib.sha256()
    for root, dirs, files in os.walk(directory):
        dirs.sort()
        for name in sorted(files):
            if name.startswith("captions_") or name.startswith("."):  # our caches, temporaries
                continue
            st = os.stat(os.path.join(root, name))
            rel = os.path.relpath(os.path.join(root, name), directory)
            h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    return h.hexdigest()


def _read_caption_cache(path: str, source: str, count: int) -> list[dict] | None:
    """The cached caption table if it was read from these files and has `count` rows."""
    try:
        with open(path) as f:
            cached = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        log.warning("%s is unreadable (%s): rebuilding it", path, e)
        return None
    if not (isinstance(cached, dict) and cached.get("source") == source
            and isinstance(cached.get("rows"), list) and len(cached["rows"]) == count
            and all(isinstance(r, dict) and "num_regions" in r and "captions" in r
                    for r in cached["rows"])):
        log.info("%s was read from other data or by an older version: rebuilding it", path)
        return None
    return cached["rows"]


def split_digest(dataset: RetrievalDataset, split: str) -> str:
    """A digest of what a split holds, for caches of its embeddings: the dataset's name, its
    files (`files_signature`) and the split's caption table (every image's captions and
    region count). SHA-256 hex."""
    h = hashlib.sha256(f"{dataset.name}\0{split}\0".encode())
    h.update(files_signature(dataset.directory).encode())
    h.update(json.dumps(dataset.caption_table(split), sort_keys=True).encode())
    return h.hexdigest()


def make_builder(name: str, config=None, data_dir: str | None = None,
                 **overrides) -> tfds.core.DatasetBuilder:
    """The TFDS builder of a registered dataset. `config` is a config name or object;
    `overrides` replace fields of the named config (e.g. train_size=2000 for scenes)."""
    if name not in BUILDERS:
        raise KeyError(f"unknown dataset {name!r}; registered: {sorted(BUILDERS)} (or give "
                       f"the directory of a prepared dataset)")
    cls = BUILDERS[name]
    if config is None or isinstance(config, str):
        configs = {c.name: c for c in cls.BUILDER_CONFIGS}
        if config is None and configs:
            config = cls.BUILDER_CONFIGS[0].name
        if config not in configs:
            raise KeyError(f"dataset {name!r} has no config {config!r} (configs: "
                           f"{sorted(configs)}); pass a config object for other settings")
        config = configs[config]
    if overrides:
        bad = sorted(set(overrides) - {f.name for f in dataclasses.fields(config)})
        if bad:
            raise KeyError(f"dataset {name!r}: unknown config field(s) {bad}")
        config = dataclasses.replace(config, **overrides)
        # TFDS keys directories by config name: other settings get a name of their own.
        digest = hashlib.sha1(json.dumps(config.settings(), sort_keys=True).encode())
        config = dataclasses.replace(config, name=f"{config.name}-{digest.hexdigest()[:10]}")
    return cls(config=config, data_dir=os.path.expanduser(data_dir or DEFAULT_DATA_DIR),
               file_format="array_record")


# Another process preparing the same data (a sweep's runs starting together): wait for it.
PREPARE_WAIT_S = 24 * 3600.0


def prepare(builder: tfds.core.DatasetBuilder, manual_dir: str | None = None,
            wait: float = PREPARE_WAIT_S) -> tfds.core.DatasetBuilder:
    """Generates or converts the dataset unless it is already there (then checks that it was
    made with the same settings); returns the builder to read it with.

    One process prepares a dataset at a time: others wait for it (up to `wait` seconds, then
    `fileutil.LockedError` naming it) and reuse what it made. TFDS builds the data in an
    `incomplete.*` sibling and renames it into place when it is whole, so a kill leaves only
    that sibling, which the next preparation removes. A version directory that is not a
    prepared dataset but holds files is refused (`fileutil.OwnershipError`), before any work.
    """
    if builder.is_prepared() and not _vocabulary_missing(builder):
        builder_base.check_settings(builder)
        return builder
    path = os.fspath(builder.data_path)
    with fileutil.exclusive(path, "dataset", wait=wait):
        if not builder.is_prepared():
            _remove_incomplete(path)
            _check_not_foreign(path)
            if os.path.isdir(path):  # empty: TFDS would take it for prepared data and reuse it
                os.rmdir(path)
            download_config = tfds.download.DownloadConfig(
                manual_dir=os.path.expanduser(manual_dir) if manual_dir else None)
            # A split over 1 GB spills to disk: without TensorFlow too (tfds_spill).
            with tfds_spill.spill_without_tensorflow():
                builder.download_and_prepare(download_config=download_config)
            if not builder.is_prepared():
                raise RuntimeError(f"preparing {path} ended without a prepared dataset there")
            fileutil.pause_point("dataset_prepared")  # crash tests: data there, no vocabulary
        # Reopened: another process may have prepared it while this one waited.
        builder = type(builder)(config=builder.builder_config,
                                data_dir=os.fspath(builder.data_dir_root),
                                file_format="array_record")
        builder_base.check_settings(builder)
        if isinstance(builder, Scenes):
            ensure_vocabulary(builder)
    return builder


def _vocabulary_missing(builder) -> bool:
    """Whether a scenes dataset lacks the vocabulary written after its data (a kill came
    between the two)."""
    return isinstance(builder, Scenes) and not has_vocabulary(builder)


def _remove_incomplete(path: str) -> None:
    """Removes what killed preparations of `path` left: TFDS's `incomplete.XXXXXX_<version>`
    siblings. The caller holds the dataset's lock, so no live preparation by ldot_jax owns
    one; a `tfds build` of the same data_dir run beside it (which takes no lock) is not
    protected."""
    parent, version = os.path.split(path)
    if not os.path.isdir(parent):
        return
    for name in sorted(os.listdir(parent)):
        if re.fullmatch(rf"incomplete\.[A-Z0-9]{{6}}_{re.escape(version)}", name):
            log.warning("removing %s, left by a preparation that did not finish",
                        os.path.join(parent, name))
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)


def _check_not_foreign(path: str) -> None:
    present = sorted(os.listdir(path)) if os.path.isdir(path) else []
    if present:
        raise fileutil.OwnershipError(
            f"refusing to prepare a dataset into {path}: it is not a prepared dataset "
            f"(no dataset_info.json) but holds {', '.join(present[:8])}"
            + (" …" if len(present) > 8 else "") + "; move them away or use another data_dir")


def load(name_or_dir: str, *, config=None, data_dir: str | None = None,
         manual_dir: str | None = None, vocab: str | None = None,
         **overrides) -> RetrievalDataset:
    """Opens a dataset, preparing it on first use.

    `vocab`: a vocab.txt (or a directory saved by `Tokenizer.save`); default: the vocabulary
    saved with the data (the scenes'), else the special ids of a pre-tokenized dataset, else
    None.
    """
    if os.path.isfile(os.path.join(os.path.expanduser(name_or_dir), "dataset_info.json")):
        builder = tfds.builder_from_directory(os.path.expanduser(name_or_dir))
    elif data_dir and paths.is_remote(data_dir):
        builder = _remote_builder(name_or_dir, config, data_dir, manual_dir, overrides)
    else:
        builder = prepare(make_builder(name_or_dir, config, data_dir, **overrides),
                          manual_dir)
    directory = os.fspath(builder.data_dir)
    settings = dict(builder.info.metadata or {}).get("settings", {})
    tokenizer = _tokenizer(vocab, directory, settings.get("text_meta"))
    sources = builder.as_data_source()
    return RetrievalDataset(name=builder.name, directory=directory,
                            spec=builder_base.record_spec_of(builder),
                            splits={str(k): v for k, v in sources.items()}, tokenizer=tokenizer,
                            settings=settings)


FORMAT = "ldot_jax.dataset"  # a prepared dataset's manifest on an object store


def _remote_builder(name: str, config, data_dir: str, manual_dir, overrides):
    """A builder reading dataset `name` kept under gs:// `data_dir` (same layout as locally:
    <data_dir>/<name>/<config>/<version>/): TFDS writes and reads ArrayRecord files, which
    must be local, so the data is prepared in the local cache, uploaded as one directory
    (fileutil.atomic_directory: committed by its manifest) and read from a checked local copy
    of it (fileutil.local_directory). The upload holds the directory's lock (a lease), so of
    several hosts starting together one prepares and the others wait and copy."""
    data_dir = paths.absolute(data_dir)
    root = paths.cache_dir("datasets", hashlib.sha256(data_dir.encode()).hexdigest()[:16])
    builder = make_builder(name, config, root, **overrides)
    relative = os.path.relpath(os.fspath(builder.data_path), root)
    remote = paths.join(data_dir, *relative.split(os.sep))
    with fileutil.exclusive(remote, "dataset", wait=PREPARE_WAIT_S):
        if fileutil.read_manifest(remote) is None:
            log.info("preparing %s locally (in %s) to upload it", remote, root)
            prepared = os.fspath(prepare(builder, manual_dir).data_path)
            with fileutil.atomic_directory(remote, FORMAT) as tmp:
                # Links, not copies: the staging directory is in the same cache.
                shutil.copytree(prepared, tmp, dirs_exist_ok=True, copy_function=_link,
                                ignore=shutil.ignore_patterns("captions_*", ".*"))
            log.info("uploaded %s", remote)
    return tfds.builder_from_directory(fileutil.local_directory(remote, FORMAT))


def _link(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _tokenizer(vocab, directory, text_meta):
    if vocab is not None:
        vocab = os.path.expanduser(vocab)
        tokenizer = (Tokenizer.load(vocab) if paths.is_dir(vocab)
                     else Tokenizer.from_vocab_file(vocab))
        if text_meta:
            theirs = {k: text_meta[k] for k in ("CLS", "SEP", "MASK")}
            ours = {"CLS": tokenizer.cls_id, "SEP": tokenizer.sep_id, "MASK": tokenizer.mask_id}
            if theirs != ours:
                raise ValueError(f"vocabulary {vocab} has special ids {ours}, but the dataset's "
                                 f"ids were made with {theirs}: use the vocab.txt of the "
                                 f"tokenizer named in the txt_db's meta.json")
        return tokenizer
    if os.path.isfile(os.path.join(directory, "vocab.txt")):
        return Tokenizer.load(directory)
    if text_meta:
        return PretokenizedText(text_meta)
    return None


def load_for_run(data_config) -> RetrievalDataset:
    """The dataset of a run config's `data` section. In a multi-process job, process 0
    prepares it first (generation or conversion) while the others wait, then they open it."""
    import jax  # only here: the data generators' worker processes do not need JAX
    from jax.experimental import multihost_utils
    c = data_config
    kwargs = dict(config=c.get("config"), data_dir=c.get("data_dir"),
                  manual_dir=c.get("manual_dir"), vocab=c.get("vocab"),
                  **dict(c.get("overrides", {}) or {}))
    if jax.process_index() == 0:
        dataset = load(c.name, **kwargs)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("ldot_jax: dataset prepared")
    if jax.process_index() != 0:
        dataset = load(c.name, **kwargs)
    return dataset
