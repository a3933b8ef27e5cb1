"""Datasets: the scenes builder (generated once, reused, settings guarded) and every reader on
files written in the users' real formats."""

import json
import os

import numpy as np
import pytest

from ldot_jax.data import datasets, workers, pipeline, scenes, schema, uniter_db
from ldot_jax.data.scenes_builder import scenes_config
from ldot_jax.data.tokenizer import Tokenizer
import fixture_files as ff

TINY = dict(train_size=130, val_size=10, test_size=10)  # train: 3 jobs for 2 workers


def _text(value):
    return value.decode() if isinstance(value, bytes) else value


# ---------------------------------------------------------------------------------------------
# scenes


@pytest.fixture(scope="module")
def scenes_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("scenes"))


def test_scenes_generated_in_parallel_equal_the_generator(scenes_dir, monkeypatch):
    monkeypatch.setenv("LDOT_DATA_WORKERS", "2")
    data = datasets.load("scenes", data_dir=scenes_dir, **TINY)
    assert {k: len(v) for k, v in data.splits.items()} == {"train": 130, "val": 10, "test": 10}
    assert data.spec == schema.RecordSpec(256, scenes.NUM_CLASSES, 64)
    config = scenes_config(**TINY).scenes_config()
    expected = scenes.generate_chunk((0, "test", 0, 10, config, 64))
    for i, want in enumerate(expected):  # order kept: position i is image i
        got = data.split("test")[i]
        assert _text(got["image_id"]) == want["image_id"] == f"test_{i:06d}"
        assert [_text(c) for c in got["captions"]] == want["captions"]
        np.testing.assert_array_equal(got["region_feat"], want["region_feat"].astype(np.float16))
        np.testing.assert_array_equal(got["boxes"], want["boxes"])
        np.testing.assert_array_equal(got["image"], want["image"])
        assert got["soft_labels"].shape == (len(want["boxes"]), scenes.NUM_CLASSES)
    # The generator judges which test captions are true of which test images.
    truth = data.caption_truth("test")
    assert truth.shape == (50, 10) and truth[np.arange(50), np.arange(50) // 5].all()
    # The vocabulary trained on the train captions is saved with the data and covers them.
    assert os.path.isfile(os.path.join(data.directory, "vocab.txt"))
    caption = expected[0]["captions"][0]
    assert data.tokenizer.unk_id not in data.tokenizer.encode(caption)
    assert data.tokenizer.decode(data.tokenizer.encode(caption)) == caption.replace(",", " ,")


def test_a_split_over_the_memory_buffer_spills_without_tensorflow(scenes_dir, tmp_path,
                                                                 monkeypatch):
    """TFDS spills a split over its 1 GB buffer to bucket files through tf.io.gfile; without
    TensorFlow (this venv has none) that failed after the whole generation. With the buffer
    shrunk to 20 KB every split spills (the scenes' 130 train records are ~2 MB), and the
    records are those of the in-memory preparation, in order; no bucket file is left."""
    from tensorflow_datasets.core import shuffle
    from ldot_jax.data import tfds_spill
    assert not tfds_spill.tensorflow_installed()
    in_memory = datasets.load("scenes", data_dir=scenes_dir, **TINY)
    monkeypatch.setattr(shuffle, "MAX_MEM_BUFFER_SIZE", 20_000)
    spilled_dir = tmp_path / "spilled"
    spilled = datasets.load("scenes", data_dir=str(spilled_dir), **TINY)
    assert shuffle.tf is not tfds_spill.SHIM  # restored after the preparation
    for split in ("train", "val", "test"):
        assert len(spilled.split(split)) == len(in_memory.split(split))
        for i in (0, 1, 63, 64, len(in_memory.split(split)) - 1):
            if i >= len(in_memory.split(split)):
                continue
            got, want = spilled.split(split)[i], in_memory.split(split)[i]
            assert got["image_id"] == want["image_id"]
            np.testing.assert_array_equal(got["image"], want["image"])
            np.testing.assert_array_equal(got["region_feat"], want["region_feat"])
    leftovers = [p for p in spilled_dir.rglob("*") if "bucket" in p.name or "tmp" in p.name]
    assert not leftovers, leftovers
    # Without the stand-in, the spill is what failed.
    monkeypatch.setattr(tfds_spill, "tensorflow_installed", lambda: True)
    with pytest.raises(ModuleNotFoundError, match="tensorflow"):
        datasets.load("scenes", data_dir=str(tmp_path / "failing"), **TINY)


def test_caption_table_is_cached(scenes_dir):
    data = datasets.load("scenes", data_dir=scenes_dir, **TINY)
    table = data.caption_table("val")
    assert [row["captions"] for row in table] == [
        [_text(c) for c in data.split("val")[i]["captions"]] for i in range(10)]
    assert [row["num_regions"] for row in table] == [
        len(data.split("val")[i]["region_feat"]) for i in range(10)]
    path = os.path.join(data.directory, "captions_val.json")
    source = json.load(open(path))["source"]  # what the table was read from
    cached = [{"captions": ["cached"], "num_regions": 3}] * len(table)
    with open(path, "w") as f:  # the second call reads the cache
        json.dump({"source": source, "rows": cached}, f)
    assert data.caption_table("val") == cached
    with open(path, "w") as f:  # a table without region counts (older version) is rebuilt
        json.dump({"source": source, "rows": [{"captions": ["cached"]}] * len(table)}, f)
    assert data.caption_table("val") == table
    os.remove(path)


def test_scenes_reused_not_regenerated(scenes_dir, monkeypatch):
    datasets.load("scenes", data_dir=scenes_dir, **TINY)

    def no_generation(*args, **kwargs):
        raise AssertionError("regenerated")
    monkeypatch.setattr(workers, "ordered_map", no_generation)
    data = datasets.load("scenes", data_dir=scenes_dir, **TINY)
    assert len(data.split("train")) == 130
    with pytest.raises(KeyError, match="no split 'dev'.*test"):
        data.split("dev")


def test_scenes_other_settings_never_reuse_a_directory(scenes_dir):
    datasets.load("scenes", data_dir=scenes_dir, **TINY)
    prepared = datasets.make_builder("scenes", data_dir=scenes_dir, **TINY)
    tampered = scenes_config(prepared.builder_config.name, seed=5, **TINY)
    builder = datasets.Scenes(config=tampered, data_dir=scenes_dir, file_format="array_record")
    with pytest.raises(ValueError, match=r"other settings.*'seed': \(0, 5\)"):
        datasets.prepare(builder)


def test_unknown_dataset_config_and_field():
    with pytest.raises(KeyError, match="unknown dataset 'flickr'"):
        datasets.make_builder("flickr")
    with pytest.raises(KeyError, match="no config 'big'"):
        datasets.make_builder("scenes", "big")
    with pytest.raises(KeyError, match=r"unknown config field\(s\) \['trian_size'\]"):
        datasets.make_builder("scenes", trian_size=3)


def test_failed_worker_names_the_job():
    with pytest.raises(RuntimeError, match="failed on job 1"):
        list(workers.ordered_map("ldot_jax.data.scenes:generate_chunk",
                                  [(0, "x", 0, 1, scenes.ScenesConfig(), 0), None], workers=2))


# ---------------------------------------------------------------------------------------------
# Karpathy JSON + per-image npz


def test_karpathy(tmp_path):
    root = tmp_path / "flickr"
    images = ff.write_karpathy(str(root), "flickr30k",
                               {"train": 3, "val": 2, "test": 2, "restval": 1})
    data = datasets.load("karpathy", config="flickr30k", data_dir=str(tmp_path / "out"),
                         manual_dir=str(root), feat_dim=ff.FEAT_DIM)
    assert {k: len(v) for k, v in data.splits.items()} == {"train": 4, "val": 2, "test": 2}
    record = data.split("train")[3]  # restval joins train, in file order
    assert _text(record["image_id"]) == "0000000007"
    assert [_text(c) for c in record["captions"]] == [s["raw"] for s in images[7]["sentences"]]
    stored = np.load(root / "features" / "0000000007.npz")
    np.testing.assert_array_equal(record["region_feat"], stored["features"])
    corners = stored["boxes"]
    w, h = corners[:, 2] - corners[:, 0], corners[:, 3] - corners[:, 1]
    np.testing.assert_allclose(record["boxes"], np.c_[corners, w, h, w * h], rtol=1e-6)
    assert data.tokenizer is None


def test_karpathy_bad_inputs(tmp_path):
    root = tmp_path / "coco"
    ff.write_karpathy(str(root), "coco", {"train": 2, "test": 1})
    os.remove(root / "features" / "0000000001.npz")
    with pytest.raises(FileNotFoundError, match="image '0000000001'.*0000000001.npz"):
        datasets.load("karpathy", config="coco", data_dir=str(tmp_path / "a"),
                      manual_dir=str(root), feat_dim=ff.FEAT_DIM)
    with pytest.raises(ValueError, match=r"0000000000.npz: features of shape \(\d, 16\).*\[n, 2048\]"):
        datasets.load("karpathy", config="coco", data_dir=str(tmp_path / "b"),
                      manual_dir=str(root))
    with pytest.raises(FileNotFoundError, match="dataset_coco.json does not exist"):
        datasets.load("karpathy", config="coco", data_dir=str(tmp_path / "c"),
                      manual_dir=str(tmp_path))


def test_empty_split_is_an_error(tmp_path):
    root = tmp_path / "f"
    ff.write_karpathy(str(root), "flickr30k", {"train": 2, "test": 1})
    with pytest.raises(ValueError, match="split 'val' is empty"):
        datasets.load("karpathy", data_dir=str(tmp_path / "o"), manual_dir=str(root),
                      feat_dim=ff.FEAT_DIM)


# ---------------------------------------------------------------------------------------------
# Multi30K


def test_multi30k_languages_and_tasks(tmp_path):
    root = tmp_path / "m30k"
    ff.write_multi30k(str(root), {"train": 3, "val": 2, "test": 2})
    de = datasets.load("multi30k", config="de", data_dir=str(tmp_path / "o"),
                       manual_dir=str(root), feat_dim=ff.FEAT_DIM)
    assert [_text(c) for c in de.split("val")[1]["captions"]] == [
        "Ein Hund läuft über die Straße 1"]  # val came gzipped
    assert _text(de.split("test")[0]["image_id"]) == "1005"
    fr = datasets.load("multi30k", config="fr", data_dir=str(tmp_path / "o"),
                       manual_dir=str(root), feat_dim=ff.FEAT_DIM)
    assert _text(fr.split("train")[2]["captions"][0]) == "Un chien court dans la rue 2"
    task2 = datasets.load("multi30k", config="de_task2", data_dir=str(tmp_path / "o"),
                          manual_dir=str(root), feat_dim=ff.FEAT_DIM)
    assert [_text(c) for c in task2.split("train")[1]["captions"]] == [
        f"Beschreibung {k} von Bild 1" for k in range(1, 6)]


def test_multi30k_misaligned_files(tmp_path):
    root = tmp_path / "m30k"
    ff.write_multi30k(str(root), {"train": 3, "val": 2, "test": 2})
    with open(root / "task1" / "raw" / "train.de", "a") as f:
        f.write("one line too many\n")
    with pytest.raises(ValueError, match=r"train.de: 4 captions for 3 images"):
        datasets.load("multi30k", config="de", data_dir=str(tmp_path / "o"),
                      manual_dir=str(root), feat_dim=ff.FEAT_DIM)


def test_multilingual_vocabulary(tmp_path):
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "Ein", "Hund", "läuft", "über", "die",
              "Straße", "Un", "chien", "Bild", "##s"]
    (tmp_path / "vocab.txt").write_text("".join(t + "\n" for t in tokens), encoding="utf-8")
    tokenizer = Tokenizer.from_vocab_file(tmp_path / "vocab.txt")
    assert not tokenizer.lowercase  # cased: accents and capitals are kept
    ids = tokenizer.encode("Ein Hund läuft über die Straße")
    assert ids == [2, 5, 6, 7, 8, 9, 10, 3]
    assert tokenizer.encode("Bilds") == [2, 13, 14, 3]


# ---------------------------------------------------------------------------------------------
# JSONL custom format


def test_jsonl(tmp_path):
    root = tmp_path / "mine"
    ff.write_jsonl(str(root), "test", [
        {"image_id": "b", "caption": "first of b"}, {"image_id": "a", "caption": "only a"},
        {"image_id": "b", "caption": "second of b"}, {"image_id": "gallery"}])
    data = datasets.load("jsonl", data_dir=str(tmp_path / "o"), manual_dir=str(root),
                         feat_dim=ff.FEAT_DIM)
    test = data.split("test")
    assert [_text(test[i]["image_id"]) for i in range(3)] == ["b", "a", "gallery"]
    assert [_text(c) for c in test[0]["captions"]] == ["first of b", "second of b"]
    assert len(test[2]["captions"]) == 0
    assert data.caption_truth("test") is None  # only generated data can tell


def test_jsonl_bad_inputs(tmp_path):
    root = tmp_path / "mine"
    ff.write_jsonl(str(root), "train", [{"image_id": "a", "caption": "x"}])
    with open(root / "train.jsonl", "a") as f:
        f.write("{not json\n")
    with pytest.raises(ValueError, match=r"train.jsonl:2: not valid JSON"):
        datasets.load("jsonl", data_dir=str(tmp_path / "o"), manual_dir=str(root),
                      feat_dim=ff.FEAT_DIM)
    ff.write_jsonl(str(root), "train", [{"image_id": "a", "caption": "x"}])
    with open(root / "train.jsonl", "a") as f:
        f.write('{"image_id": "nowhere", "caption": "y"}\n')
    with pytest.raises(FileNotFoundError, match="image 'nowhere'.*nowhere.npz does not exist"):
        datasets.load("jsonl", data_dir=str(tmp_path / "o2"), manual_dir=str(root),
                      feat_dim=ff.FEAT_DIM)
    with open(root / "train.jsonl", "w") as f:
        f.write('{"image_id": "../escape", "caption": "y"}\n')
    with pytest.raises(ValueError, match=r"train.jsonl:1: image_id '../escape' cannot name"):
        datasets.load("jsonl", data_dir=str(tmp_path / "o3"), manual_dir=str(root),
                      feat_dim=ff.FEAT_DIM)


# ---------------------------------------------------------------------------------------------
# UNITER / LightningDOT LMDB databases


def test_compute_num_bb():
    conf = np.r_[np.full(30, 0.9), np.full(80, 0.1)]
    assert uniter_db.compute_num_bb(conf) == 30
    assert uniter_db.compute_num_bb(conf[25:]) == 10  # at least min_bb
    assert uniter_db.compute_num_bb(np.full(150, 0.9)) == 100  # at most max_bb
    assert uniter_db.compute_num_bb(conf, conf_th=0.05, max_bb=200) == 110


@pytest.fixture
def uniter_files(tmp_path):
    rng = np.random.default_rng(0)
    images = {f"flickr30k_{i:012d}.npz": ff.regions(rng, 12, classes=7) for i in range(3)}
    nbb = {name: 10 + i for i, name in enumerate(images)}  # image 2 keeps all 12
    names = list(images)
    texts = [("t0", names[1], [2000, 2001, 2002], "a dog"), ("t1", names[0], [2010], "a cat"),
             ("t2", names[1], [2020, 2021], "dog again")]
    ff.write_img_db(str(tmp_path / "img_plain"), images, nbb)
    ff.write_img_db(str(tmp_path / "img_packed"), images, nbb, compressed=True)
    ff.write_txt_db(str(tmp_path / "txt"), texts)
    return tmp_path, images, nbb, texts


@pytest.mark.parametrize("kind", ["img_plain", "img_packed"])
def test_image_db_reader(uniter_files, kind):
    root, images, nbb, _ = uniter_files
    db = uniter_db.ImageDb(str(root / kind))
    assert db.compressed == (kind == "img_packed")
    assert db.names() == list(images)  # __keys__ skipped
    for name, arrays in images.items():
        got = db[name]
        for key in ("features", "norm_bb", "conf", "soft_labels"):
            assert got[key].dtype == np.float32
            np.testing.assert_array_equal(got[key], arrays[key][:nbb[name]].astype(np.float32))
    with pytest.raises(KeyError, match="no image 'missing.npz'"):
        db["missing.npz"]


def test_text_db_reader(uniter_files):
    root, _, _, texts = uniter_files
    db = uniter_db.TextDb(str(root / "txt"))
    assert db.ids == ["t0", "t1", "t2"]
    assert db["t2"]["input_ids"] == [2020, 2021] and db["t2"]["raw"] == "dog again"
    assert db.images() == [texts[0][1], texts[1][1]]


def test_uniter_conversion(uniter_files):
    root, images, nbb, texts = uniter_files
    config = uniter_db.uniter_config("tiny", {"train": (root / "txt", root / "img_plain")},
                                     soft_labels=True, feat_dim=ff.FEAT_DIM)
    config.num_classes = 7  # the fixture's detector has 7 classes, not 1601
    builder = datasets.UniterDb(config=config, data_dir=str(root / "out"),
                                file_format="array_record")
    datasets.prepare(builder)
    data = datasets.load(os.fspath(builder.data_dir))
    assert isinstance(data.tokenizer, datasets.PretokenizedText)
    assert (data.tokenizer.cls_id, data.tokenizer.sep_id, data.tokenizer.mask_id) == (101, 102,
                                                                                       103)
    index = pipeline.tokenize_captions(data.caption_table("train"), data.tokenizer, None,
                                       "drop")
    assert [t.tolist() for t in index.token_ids] == [[101, 2000, 2001, 2002, 102],
                                                     [101, 2020, 2021, 102], [101, 2010, 102]]
    train = data.split("train")
    first = train[0]  # images in order of their first text
    assert _text(first["image_id"]) == "flickr30k_000000000001"
    assert [x.tolist() for x in schema.split_caption_ids(first)] == [[2000, 2001, 2002],
                                                                    [2020, 2021]]
    name = texts[0][1]
    np.testing.assert_array_equal(first["region_feat"], images[name]["features"][:nbb[name]])
    bb = images[name]["norm_bb"][:nbb[name]].astype(np.float32)
    np.testing.assert_allclose(first["boxes"], np.c_[bb, bb[:, 4] * bb[:, 5]], rtol=1e-6)
    np.testing.assert_array_equal(first["soft_labels"],
                                  images[name]["soft_labels"][:nbb[name]])


def test_uniter_bad_inputs(uniter_files, tmp_path):
    root, images, nbb, texts = uniter_files
    import lmdb
    env = lmdb.open(str(root / "img_plain" / "feat_th0.2_max100_min10"), map_size=1 << 26)
    with env.begin(write=True) as txn:
        txn.put(list(images)[0].encode(), b"\xc1 not msgpack")
    env.close()
    db = uniter_db.ImageDb(str(root / "img_plain"))
    with pytest.raises(ValueError, match="value of 'flickr30k_000000000000.npz' cannot be "
                                         "decoded as a msgpack-numpy record"):
        db[list(images)[0]]
    ff.write_txt_db(str(tmp_path / "txt2"), [("x", "unknown.npz", [5], "?")])
    config = uniter_db.uniter_config("bad", {"train": (tmp_path / "txt2", root / "img_packed")},
                                     feat_dim=ff.FEAT_DIM)
    builder = datasets.UniterDb(config=config, data_dir=str(tmp_path / "o"),
                                file_format="array_record")
    with pytest.raises(KeyError, match="image 'unknown.npz', which is not in"):
        datasets.prepare(builder)
    with pytest.raises(FileNotFoundError, match="img_plain/id2len.json does not exist"):
        uniter_db.TextDb(str(root / "img_plain"))
    (root / "empty").mkdir()
    (root / "empty" / "nbb_th0.2_max100_min10.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="feat_th0.2_max100_min10: no LMDB database"):
        uniter_db.ImageDb(str(root / "empty"))


def test_vocabulary_must_match_pretokenized_ids(uniter_files, tmp_path):
    root = uniter_files[0]
    config = uniter_db.uniter_config("v", {"val": (root / "txt", root / "img_packed")},
                                     feat_dim=ff.FEAT_DIM)
    builder = datasets.UniterDb(config=config, data_dir=str(tmp_path / "o"),
                                file_format="array_record")
    datasets.prepare(builder)
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nword\n")
    with pytest.raises(ValueError, match="special ids.*made with"):
        datasets.load(os.fspath(builder.data_dir), vocab=str(vocab))
