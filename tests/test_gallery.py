"""A user's own gallery (retrieval/gallery.py) and filtered search (retrieval/filters.py):
pictures embedded by a converted open_clip model and region features by a LightningDOT model
are indexed with no training run and queried through Retriever.from_dirs with results equal to
brute force over the model's own vectors; filters (metadata, allow-lists of ids and keys) in
both modes equal brute force over the allowed items; bad gallery files are named; decoded
pictures are reused, and redone when a file changes; the command line builds and queries."""

import dataclasses
import json
import os
import pathlib
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

import ldot_jax
from ldot_jax.checkpoints import pretrained
from ldot_jax.core import numerics
from ldot_jax.data import images, picture_files
from ldot_jax.index import base as index_base
from ldot_jax.retrieval import filters, gallery
from ldot_jax.retrieval.retriever import Retriever
from ldot_jax.tools import index_cli

import faults
import gallery_fixtures
from gallery_fixtures import HERE, PICTURES


pytestmark = pytest.mark.xdist_group("test_gallery")


@pytest.fixture(scope="module")
def clip_model(tmp_path_factory):
    return gallery_fixtures.clip_model(tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    return gallery_fixtures.pictures(tmp_path_factory.mktemp("photos"))


@pytest.fixture(scope="module")
def picture_gallery(clip_model, pictures, tmp_path_factory):
    out = tmp_path_factory.mktemp("gallery") / "photos"
    built = gallery.build_gallery(clip_model, pictures[1], str(out), backend="exact",
                                  workers=1, progress=False)
    return out, built


def _clip_vectors(model_dir, files):
    model, params = ldot_jax.load_dual_encoder(model_dir)
    pixels = np.stack([images.load_pixels(f, model.config.pixels.image_size) for f in files])
    vectors = model.apply({"params": params}, {"pixels": jnp.asarray(pixels)},
                          method=model.encode_image)
    return np.asarray(vectors)


def test_pictures_indexed_and_queried_without_a_run(clip_model, pictures, picture_gallery):
    out, built = picture_gallery
    root, _, rows = pictures
    assert set(built.indexes) == {"image", "text"}
    # The index holds the model's vectors of the pictures, in gallery order.
    index = ldot_jax.load_index(str(out / "image"))
    want = _clip_vectors(clip_model, [root / r["image"] for r in rows])
    normalized = pretrained.load_pretrained(clip_model).config.normalize_embeddings
    if normalized:
        want = numerics.l2_normalize(want)
    np.testing.assert_allclose(index.vectors_of(np.arange(len(rows))), want, atol=1e-5)
    # Health: the gallery's captions as queries against exact search.
    assert index.info["health"]["query_side"] == "text" and index.info["health"]["exact"]
    items = json.loads((out / "image" / "items.json").read_text())
    assert items["keys"] == [r["id"] for r in rows]
    assert items["fields"][3] == {"source": "flickr", "tags": ["odd", "t0"], "year": 2003}
    retriever = Retriever.from_dirs(clip_model, str(out))
    hits = retriever.search_text(["a red square", "a dog"], k=4)
    queries = retriever.encode_text(["a red square", "a dog"])
    brute = np.argsort(-(queries @ want.T), axis=1, kind="stable")[:, :4]
    np.testing.assert_array_equal(hits.ids, brute)
    np.testing.assert_allclose(hits.scores, np.take_along_axis(queries @ want.T, brute, 1),
                               atol=1e-5)
    assert hits.names[0][0] == rows[brute[0, 0]]["name"]
    # Image → caption: the ten captions of the first five pictures.
    text_hits = retriever.search_image([gallery.image_file_input(retriever.model.config,
                                                                 root / rows[0]["image"])], k=3)
    assert text_hits.ids.shape == (1, 3) and text_hits.names[0][0].split()[-1].isdigit()


def test_deleting_a_picture_deletes_its_captions(clip_model, picture_gallery, tmp_path):
    out, _ = picture_gallery
    copy = tmp_path / "copy"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("build"))
    retriever = Retriever.from_dirs(clip_model, str(copy))
    assert len(retriever.indexes["text"]) == 10  # two captions of each of the first five
    retriever.delete(keys=["p0"])
    reloaded = Retriever.from_dirs(clip_model, str(copy))
    owners = reloaded.catalogs["text"].owners
    assert len(reloaded.indexes["text"]) == 8 and 0 not in owners.values()
    assert sorted(owners) == sorted(reloaded.indexes["text"].ids.tolist())
    assert len(reloaded.indexes["image"]) == 8 and "p0" not in reloaded.catalogs["image"].keys


def test_filters_on_a_picture_gallery(clip_model, picture_gallery):
    out, _ = picture_gallery
    retriever = Retriever.from_dirs(clip_model, str(out))
    queries = retriever.encode_text(["a red square"])
    vectors = ldot_jax.load_index(str(out / "image")).vectors_of(np.arange(9))
    scores = (queries @ vectors.T)[0]

    def brute(allowed, k):
        allowed = np.asarray(sorted(allowed))
        return allowed[np.argsort(-scores[allowed], kind="stable")[:k]]
    cases = [({"source": "coco"}, {0, 2, 4, 6, 8}),
             ({"tags": ["t0", "t2"]}, {0, 2, 3, 5, 6, 8}),
             ({"source": "flickr", "tags": "t0"}, {3}),
             ({"year": 2001}, {1, 5}),
             ({"id": [7, 2, 5]}, {2, 5, 7}),
             ({"key": ["p8", "p1"]}, {1, 8})]
    for where, allowed in cases:
        hits = retriever.search_text(["a red square"], k=3, where=where)
        assert hits.filter["mode"] == "subset" and hits.filter["allowed"] == len(allowed)
        np.testing.assert_array_equal(hits.ids[0], brute(allowed, 3), err_msg=str(where))
    for where, match in [({"colour": "red"}, r"unknown field 'colour'.*\['source', 'tags', "
                                             r"'year'\]"),
                         ({"id": [99]}, r"ids not in the index: \[99\]"),
                         ({"key": ["nope"]}, r"keys not in the gallery: \['nope'\]"),
                         ({"source": []}, "empty list"),
                         ({}, "non-empty"),
                         ({"source": {"a": 1}}, "not a string")]:
        with pytest.raises(ValueError, match=match):
            retriever.search_text(["a red square"], k=3, where=where)
    # True is not 1: a bool field does not match a number.
    table = filters.FieldTable({0: {"flag": True}, 1: {"flag": 1}})
    assert table.matching("flag", [True]) == {0} and table.matching("flag", [1]) == {1}


@pytest.fixture(scope="module")
def region_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("regions")
    model_dir, model_cfg = gallery_fixtures.random_model(root / "model", "finetune", 3)
    return model_dir, gallery_fixtures.vocab(root / "vocab.txt"), model_cfg


@pytest.fixture(scope="module")
def region_gallery(region_model, tmp_path_factory):
    model_dir, _, model_cfg = region_model
    root = tmp_path_factory.mktemp("region_gallery")
    rng = np.random.default_rng(0)
    (root / "feats").mkdir()
    rows = []
    for i in range(300):
        n = int(rng.integers(2, 9))
        xs, ys = np.sort(rng.uniform(0, 1, (2, n, 2)), axis=2)
        corners = np.stack([xs[:, 0], ys[:, 0], xs[:, 1], ys[:, 1]], axis=1)  # x1 y1 x2 y2
        np.savez(root / "feats" / f"{i}.npz",
                 features=rng.normal(size=(n, model_cfg.region.feat_dim)).astype(np.float32),
                 boxes=corners.astype(np.float32))
        rows.append({"id": i * 10, "features": f"feats/{i}.npz", "shard": f"s{i % 7}",
                     "rare": i in (5, 123, 250)})
    path = gallery_fixtures.write_jsonl(root / "regions.jsonl", rows)
    out = root / "out"
    built = gallery.build_gallery(model_dir, path, str(out), backend="scann", progress=False,
                                  shard_size=128)
    return root, out, rows, built


def test_region_gallery_and_both_filter_modes(region_model, region_gallery):
    model_dir, vocab, _ = region_model
    root, out, rows, built = region_gallery
    assert set(built.indexes) == {"image"}
    index = ldot_jax.load_index(str(out / "image"))
    assert index.type == "scann" and index.scann_params.keep_vectors
    # Health without captions: a sample of the gallery's own vectors as queries.
    assert index.info["health"]["query_side"] == "image"
    retriever = Retriever.from_dirs(model_dir, str(out), tokenizer=vocab)
    vectors = index.vectors_of(np.arange(300))
    # The index's vectors are the model's of each file.
    first = retriever.encode_image([gallery.image_file_input(retriever.model.config,
                                                             str(root / "feats" / "0.npz"))])
    np.testing.assert_allclose(vectors[0], first[0], atol=1e-5)
    captions = ["a red circle", "blue square left of a circle", "a"]
    queries = retriever.encode_text(captions)
    scores = queries @ vectors.T

    def brute(allowed, k):
        allowed = np.asarray(sorted(allowed))
        order = np.argsort(-scores[:, allowed], axis=1, kind="stable")[:, :k]
        return allowed[order]
    small = {i for i in range(300) if rows[i]["shard"] == "s3"}          # 43 items
    rare = {5, 123, 250}
    for where, allowed in [({"shard": "s3"}, small), ({"rare": True}, rare),
                           ({"shard": ["s1", "s2", "s4", "s5", "s6"]},
                            {i for i in range(300) if rows[i]["shard"] not in ("s0", "s3")})]:
        for limit, mode in [(4096, "subset"), (0, "overfetch")]:
            retriever_hits = (retriever.search_text(captions, k=5, where=where) if limit
                              else None)
            allowed_ids = filters.allowed_ids(where, index.ids,
                                              retriever.catalogs["image"].fields)
            hits, info = filters.search(index, queries, 5, allowed_ids, subset_limit=limit)
            assert info.mode == mode and info.allowed == len(allowed)
            want = brute(allowed, min(5, len(allowed)))
            # Brute-force ScaNN (under 20k vectors): both modes are exact.
            np.testing.assert_array_equal(hits.ids, want, err_msg=f"{where} {mode}")
            if retriever_hits is not None:
                np.testing.assert_array_equal(retriever_hits.ids, want)
                assert retriever_hits.filter["mode"] == "subset"
    # Overfetch with a bound too small for rare items: fewer than k, padded, never wrong.
    allowed_ids = np.asarray(sorted(rare))
    hits, info = filters.search(index, queries, 3, allowed_ids, subset_limit=0, max_fetch=20)
    assert info.fetched == 20
    for q in range(len(captions)):
        found = hits.ids[q][hits.ids[q] >= 0]
        assert set(found) <= rare
        top20 = set(np.argsort(-scores[q], kind="stable")[:20].tolist())
        assert set(found) == rare & top20
        assert np.all(np.isneginf(hits.scores[q][hits.ids[q] < 0]))
    # Gallery keys are the JSONL's ids (ints given as ints become strings).
    keys = retriever.catalogs["image"].keys
    assert keys["1230"] == 123
    hits = retriever.search_text(captions[:1], k=2, where={"key": ["1230", "50"]})
    np.testing.assert_array_equal(np.sort(hits.ids[0]), [5, 123])


@pytest.mark.parametrize("line,match", [
    ("not json", r"line 2: not JSON"),
    ('{"image": "a.png"}', r"line 2: no \"id\""),
    ('{"id": "", "image": "a.png"}', r"\"id\" = ''"),
    ('{"id": true, "image": "a.png"}', r"\"id\" = True"),
    ('{"id": "x"}', r"line 2 \(id 'x'\): expected one of \"image\".*neither"),
    ('{"id": "x", "image": "a.png", "features": "a.npz"}', r"\['image', 'features'\]"),
    ('{"id": "a", "image": "b.png"}', r"line 2: id 'a' again \(first on line 1\)"),
    ('{"id": "x", "image": "a.png", "tags": [1, 2]}',
     r"field 'tags': \[1, 2\]: a list field holds strings"),
    ('{"id": "x", "image": "a.png", "size": NaN}', r"field 'size': nan is not a string"),
    ('{"id": "x", "image": "a.png", "captions": "one"}', r"\"captions\" = 'one'"),
    ('{"id": "x", "image": "a.png", "name": 3}', r"\"name\" = 3"),
    ('{"id": "x", "features": "a.npz"}', "mixes pictures and region features"),
])
def test_bad_gallery_files_are_named(tmp_path, line, match):
    path = tmp_path / "g.jsonl"
    path.write_text('{"id": "a", "image": "a.png"}\n' + line + "\n")
    with pytest.raises(gallery.GalleryError, match=match):
        gallery.read_gallery(str(path))
    with pytest.raises(gallery.GalleryError, match="no such file"):
        gallery.read_gallery(str(tmp_path / "missing.jsonl"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(gallery.GalleryError, match="no pictures"):
        gallery.read_gallery(str(tmp_path / "empty"))


def test_region_files_checked_before_any_vector(region_model, tmp_path):
    model_dir, _, model_cfg = region_model
    dim = model_cfg.region.feat_dim
    np.savez(tmp_path / "good.npz", features=np.zeros((2, dim), np.float32),
             boxes=np.full((2, 4), 0.5, np.float32))
    np.savez(tmp_path / "wide.npz", features=np.zeros((2, dim + 1), np.float32),
             boxes=np.full((2, 4), 0.5, np.float32))
    np.savez(tmp_path / "nan.npz", features=np.full((2, dim), np.nan, np.float32),
             boxes=np.full((2, 4), 0.5, np.float32))
    np.savez(tmp_path / "pixel_boxes.npz", features=np.zeros((2, dim), np.float32),
             boxes=np.full((2, 4), 40.0, np.float32))
    rows = [{"id": n, "features": f"{n}.npz"} for n in ("good", "wide", "nan", "pixel_boxes",
                                                       "absent")]
    path = gallery_fixtures.write_jsonl(tmp_path / "g.jsonl", rows)
    with pytest.raises(gallery.GalleryError) as error:
        gallery.build_gallery(model_dir, path, str(tmp_path / "out"), backend="exact",
                              progress=False)
    message = str(error.value)
    assert message.startswith("4 of 5 region-feature files are bad")
    for name in ("wide.npz", "nan.npz", "pixel_boxes.npz", "absent.npz"):
        assert name in message, name
    assert not (tmp_path / "out" / "image").exists()


def test_bad_pictures_named_or_skipped(clip_model, tmp_path):
    shutil.copy(HERE / "images" / "square_32.png", tmp_path / "good.png")
    good_jpeg = (HERE / "images" / "portrait_rgb.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(good_jpeg[:len(good_jpeg) // 2])
    (tmp_path / "text.png").write_text("not a picture")
    rows = [{"id": "good", "image": "good.png"}, {"id": "cut", "image": "truncated.jpg"},
            {"id": "text", "image": "text.png"}, {"id": "gone", "image": "absent.png"}]
    path = gallery_fixtures.write_jsonl(tmp_path / "g.jsonl", rows)
    out = tmp_path / "out"
    with pytest.raises(gallery.GalleryError) as error:
        gallery.build_gallery(clip_model, path, str(out), backend="exact", workers=1,
                              progress=False)
    message = str(error.value)
    assert message.startswith("3 of 4 gallery pictures cannot be read")
    for name in ("truncated.jpg", "text.png", "absent.png"):
        assert name in message, name
    assert not (out / "image").exists()
    assert not (out / "build" / gallery.PIXELS_FILE).exists()
    gallery.build_gallery(clip_model, path, str(out), backend="exact", bad_images="skip",
                          workers=1, progress=False)
    items = json.loads((out / "image" / "items.json").read_text())
    assert items["keys"] == ["good"] and len(ldot_jax.load_index(str(out / "image"))) == 1


def test_decoded_pictures_reused_until_a_file_changes(clip_model, tmp_path, monkeypatch):
    for name in PICTURES[:3]:
        shutil.copy(HERE / "images" / name, tmp_path / name)
    calls = []
    real = picture_files.decode_all

    def counting(paths, *args, **kwargs):
        calls.append(len(paths))
        return real(paths, *args, **kwargs)
    monkeypatch.setattr(picture_files, "decode_all", counting)
    out = tmp_path / "out"
    first = gallery.build_gallery(clip_model, str(tmp_path), str(out), backend="exact",
                                  workers=1, progress=False)
    before = ldot_jax.load_index(first.indexes["image"]).vectors_of(np.arange(3))
    gallery.build_gallery(clip_model, str(tmp_path), str(out), backend="exact", workers=1,
                          progress=False)
    assert calls == [3]  # the second build read the stored pictures
    # Another picture under the first one's name: decoded again, its vector changes.
    shutil.copy(HERE / "images" / PICTURES[5], tmp_path / PICTURES[0])
    os.utime(tmp_path / PICTURES[0], ns=(1, 1))
    again = gallery.build_gallery(clip_model, str(tmp_path), str(out), backend="exact",
                                  workers=1, progress=False)
    assert calls == [3, 3]
    after = ldot_jax.load_index(again.indexes["image"]).vectors_of(np.arange(3))
    assert not np.allclose(before[0], after[0]) and np.allclose(before[1:], after[1:])
    # A folder gallery's ids are the files' relative paths; the build's own output inside
    # the folder (here: a picture an API added) is not part of it.
    assert json.loads((out / "image" / "items.json").read_text())["keys"] == sorted(PICTURES[:3])
    (out / "added").mkdir()
    shutil.copy(HERE / "images" / PICTURES[4], out / "added" / "x.png")
    gallery.build_gallery(clip_model, str(tmp_path), str(out), backend="exact", workers=1,
                          progress=False)
    assert json.loads((out / "image" / "items.json").read_text())["keys"] == sorted(PICTURES[:3])


def test_command_line_builds_and_queries_a_gallery(clip_model, pictures, tmp_path, capsys):
    _, jsonl, rows = pictures
    out = tmp_path / "cli"
    assert index_cli.main(["build", "--model", clip_model, "--gallery", jsonl, "--out",
                           str(out), "--backend", "scann", "--workers", "1",
                           "--no_progress"]) == 0
    printed = capsys.readouterr().out
    assert f"image index: {out / 'image'}" in printed and "health (" in printed
    assert index_cli.main(["query", "--model", clip_model, "--index_dir", str(out), "--text",
                           "a red square", "-k", "2"]) == 0
    printed = capsys.readouterr().out
    assert "query: a red square" in printed and "picture " in printed
    picture = str(pathlib.Path(jsonl).parent / rows[0]["image"])
    assert index_cli.main(["query", "--model", clip_model, "--index_dir", str(out), "--image",
                           picture, "-k", "2"]) == 0
    assert "caption" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--model .* and --out"):
        index_cli.main(["build", "--gallery", jsonl, "--out", str(out)])
    with pytest.raises(SystemExit, match="--workdir .* or --gallery"):
        index_cli.main(["build", "--model", clip_model])
    with pytest.raises(SystemExit, match="--split only apply"):
        index_cli.main(["build", "--model", clip_model, "--gallery", jsonl, "--out", str(out),
                        "--split", "val"])
    assert index_base.is_index_dir(str(out / "image"))


UPDATER = """
import sys
import numpy as np
from ldot_jax.retrieval.retriever import Retriever
model, out, vocab, dim = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
retriever = Retriever.from_dirs(model, out, tokenizer=vocab)
boxes = np.asarray([[0.1, 0.1, 0.6, 0.6, 0.5, 0.5, 0.25]] * 2, np.float32)
image = {"region_feat": np.ones((2, dim), np.float32), "boxes": boxes}
retriever.add_images([image], keys=["new"], fields=[{"shard": "s9"}])
"""


def _consistent_ids(model_dir, out, vocab):
    """The gallery as saved: its index and its names hold the same ids."""
    retriever = Retriever.from_dirs(model_dir, str(out), tokenizer=vocab)
    assert sorted(retriever.catalogs["image"].names) == sorted(
        retriever.indexes["image"].ids.tolist())
    return retriever


def _consistent(model_dir, out, vocab):
    """The gallery as saved: its index and its catalog hold the same ids."""
    retriever = Retriever.from_dirs(model_dir, str(out), tokenizer=vocab)
    index, catalog = retriever.indexes["image"], retriever.catalogs["image"]
    assert sorted(catalog.names) == sorted(index.ids.tolist())
    assert sorted(catalog.keys.values()) == sorted(index.ids.tolist())
    return retriever


def test_live_updates_persist_and_a_kill_leaves_old_or_new(region_model, region_gallery,
                                                            tmp_path):
    model_dir, vocab, model_cfg = region_model
    _, source, rows, _ = region_gallery
    out = tmp_path / "live"
    shutil.copytree(source / "image", out / "image")
    retriever = Retriever.from_dirs(model_dir, str(out), tokenizer=vocab)
    rng = np.random.default_rng(5)
    new = [{"region_feat": rng.normal(size=(3, model_cfg.region.feat_dim)).astype(np.float32),
            "boxes": np.tile(np.asarray([[0.1, 0.2, 0.5, 0.7, 0.4, 0.5, 0.2]], np.float32),
                             (3, 1))}
           for _ in range(3)]
    ids = retriever.add_images(new, keys=["a", "b", "c"],
                               fields=[{"shard": "s9", "tags": ["x"]}, {"shard": "s9"},
                                       {"shard": "s0"}])
    np.testing.assert_array_equal(ids, [300, 301, 302])
    # Reloaded from disk: the new items, their vectors and fields.
    reloaded = _consistent(model_dir, out, vocab)
    index = reloaded.indexes["image"]
    assert len(index) == 303 and index.info["updated"]
    np.testing.assert_allclose(index.vectors_of(ids), retriever.encode_image(new), atol=1e-5)
    hits = reloaded.search_text(["a red circle"], k=5, where={"shard": "s9"})
    assert sorted(hits.ids[0][hits.ids[0] >= 0].tolist()) == [300, 301]
    assert reloaded.catalogs["image"].fields.fields_of(300) == {"shard": "s9", "tags": ["x"]}
    # Refused updates change nothing: a taken key, an unknown key or id, a bad field.
    for call, match in [(lambda: reloaded.add_images(new[:1], keys=["a"]), "already"),
                        (lambda: reloaded.delete(keys=["zzz"]), "not in the gallery"),
                        (lambda: reloaded.delete(ids=[301, 9999]), "9999"),
                        (lambda: reloaded.add_images(new[:1], fields=[{"f": [1]}]),
                         "list field holds strings"),
                        (lambda: reloaded.add_images(new[:2], keys=["q"]), "1 for 2")]:
        with pytest.raises((ValueError, KeyError), match=match):
            call()
        assert len(_consistent(model_dir, out, vocab).indexes["image"]) == 303
    removed = reloaded.delete(ids=[7], keys=["b"])
    np.testing.assert_array_equal(removed, [7, 301])
    after = _consistent(model_dir, out, vocab)
    assert len(after.indexes["image"]) == 301 and "b" not in after.catalogs["image"].keys
    hits = after.search_text(["a red circle"], k=5, where={"shard": "s9"})
    assert hits.ids[0][hits.ids[0] >= 0].tolist() == [300]
    report = after.check_health()
    assert report["recall@1"] == 1.0 and report["query_side"] == "own vectors"
    # Ids are never given again: the largest (302) deleted, the next item still gets 303;
    # an item without a key has none after a reload.
    after.delete(ids=[302])
    assert after.add_images(new[:1]).tolist() == [303]
    again = _consistent_ids(model_dir, out, vocab)
    assert 303 in again.catalogs["image"].names and "303" not in again.catalogs["image"].keys
    again.delete(ids=[303])
    # A kill -9 while an update is saved: the old gallery before the swap, the new after.
    dim = model_cfg.region.feat_dim
    for point, count in [("before_swap", 300), ("after_swap", 301)]:
        faults.kill_at(point, [model_dir, out, vocab, dim], tmp_path, UPDATER)
        assert len(_consistent(model_dir, out, vocab).indexes["image"]) == count, point


def test_query_normalization_follows_the_run_then_the_config(clip_model):
    loaded = pretrained.load_pretrained(clip_model)
    on = dataclasses.replace(loaded.config, normalize_embeddings=True)
    off = dataclasses.replace(loaded.config, normalize_embeddings=False)
    make = lambda config, metadata: pretrained.Pretrained(loaded.kind, config, {}, metadata)
    assert gallery.query_normalization(make(off, {"normalize": True}))
    assert not gallery.query_normalization(make(on, {"normalize": False}))
    assert gallery.query_normalization(make(on, {}))
    assert not gallery.query_normalization(make(off, {}))


def test_a_gallery_on_cloud_storage(clip_model, pictures, picture_gallery, gcs_emulator,
                                    tmp_path, monkeypatch):
    """--out gs://…: the indexes are committed to the bucket (the work files stay in the local
    cache), a Retriever reads them from there with the local build's answers, and updates are
    saved back to the bucket."""
    import gcs
    from ldot_jax.core import paths
    monkeypatch.setenv(paths.CACHE_ENV, str(tmp_path / "cache"))
    _, jsonl, _ = pictures
    out = f"{gcs.fresh_prefix()}/photos"
    gallery.build_gallery(clip_model, jsonl, out, backend="exact", workers=1, progress=False)
    assert paths.is_dir(paths.join(out, "image")) and not paths.is_dir(paths.join(out, "build"))
    remote = Retriever.from_dirs(clip_model, out)
    local = Retriever.from_dirs(clip_model, str(picture_gallery[0]))
    want = local.search_text(["a red square"], k=5)
    got = remote.search_text(["a red square"], k=5)
    np.testing.assert_array_equal(got.ids, want.ids)
    np.testing.assert_allclose(got.scores, want.scores, atol=1e-6)
    picture = gallery.image_file_input(remote.model.config,
                                       str(HERE / "images" / PICTURES[0]))
    assert remote.add_images([picture], keys=["cloud"]).tolist() == [9]
    again = Retriever.from_dirs(clip_model, out)
    assert len(again.indexes["image"]) == 10 and again.catalogs["image"].keys["cloud"] == 9
