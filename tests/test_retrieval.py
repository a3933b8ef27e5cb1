"""Extraction, index build and the Retriever on a tiny run's workdir (a random-init model of
ldot_jax/configs/demo.py:finetune,tiny on the generated scenes data): what the index holds equals what
the towers give, queries reproduce exact NumPy search, an interrupted extraction resumes, a
model with another fingerprint is refused, the re-ranking hook re-sorts, and the CLI works."""

import glob
import json
import os

import jax
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from ldot_jax.checkpoints import pretrained
from ldot_jax.configs import demo  # noqa: E402
from ldot_jax.core import workdir as workdir_lib
from ldot_jax.index import base as index_base
from ldot_jax.retrieval import extract
from ldot_jax.retrieval import index_build
from ldot_jax.retrieval.retriever import Retriever
from ldot_jax.tools import index_cli as cli
from ldot_jax.training import train

import faults

# Under pytest-xdist the module fixtures are built once, on one worker.
pytestmark = pytest.mark.xdist_group("test_retrieval")


def _model_dir(path, config, seed):
    kind, model_cfg, _ = train.model_and_config(config)
    params = pretrained.init_params(kind, model_cfg, jax.random.key(seed))
    return pretrained.save_pretrained(path, kind, model_cfg, params)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A run directory as training leaves it: config.json and model/."""
    root = tmp_path_factory.mktemp("run")
    config = demo.get_config("finetune,tiny")
    config.data.data_dir = str(tmp_path_factory.mktemp("data"))
    workdir_lib.save_config(config, str(root))
    _model_dir(root / "model", config, seed=0)
    return str(root)


@pytest.fixture(scope="module")
def built(workdir):
    return index_build.build_from_workdir(workdir, shard_size=5, progress=False)


@pytest.fixture(scope="module")
def retriever(workdir, built):
    return Retriever.load(workdir)


def test_index_holds_the_towers_vectors(workdir, built, retriever):
    config = workdir_lib.load_config(workdir)
    loaded = pretrained.load_pretrained(os.path.join(workdir, "model"))
    fingerprint = pretrained.fingerprint(loaded.kind, loaded.config, loaded.params)
    images = extract.read_embeddings(built.embeddings["image"], fingerprint)
    captions = extract.read_embeddings(built.embeddings["text"], fingerprint)
    split = index_build.open_dataset(config).split("test")
    assert len(images.ids) == len(split) == 16 and len(captions.ids) == 80
    assert images.names[3] == "test_000003" and captions.owners[7] == 1
    # The query path (batch of one, padded shapes) gives the vectors the extraction stored.
    np.testing.assert_allclose(retriever.encode_text(captions.names[:3]), captions.vectors[:3],
                               rtol=1e-4, atol=1e-5)
    record = split[5]
    np.testing.assert_allclose(
        retriever.encode_image([record]),
        images.vectors[5:6], rtol=1e-4, atol=1e-5)
    for side, other, count in (("image", "text", 16), ("text", "image", 80)):
        meta = index_base.read_metadata(built.indexes[side])
        assert meta["count"] == count and meta["type"] == "scann"
        assert meta["info"]["model_fingerprint"] == fingerprint
        assert meta["info"]["health"]["query_side"] == other
        assert meta["info"]["health"]["recall@10"] == 1.0  # brute force below 20k vectors
        assert meta["info"]["build_time_s"] >= 0


def test_search_equals_exact_numpy_search(built, retriever):
    images = extract.read_embeddings(built.embeddings["image"])
    captions = extract.read_embeddings(built.embeddings["text"])
    queries = captions.names[10:14]
    hits = retriever.search_text(queries, k=5)
    want = np.argsort(-(captions.vectors[10:14] @ images.vectors.T), axis=1, kind="stable")[:, :5]
    np.testing.assert_array_equal(hits.ids, want)
    assert hits.names[0] == [images.names[i] for i in want[0]]
    assert set(hits.timings_ms) == {"encode", "search", "rerank", "total", "per_query"}
    # Image → captions.
    split = index_build.open_dataset(workdir_lib.load_config(retriever_workdir(built))).split("test")
    hits = retriever.search_image([split[2]], k=4)
    want = np.argsort(-(images.vectors[2] @ captions.vectors.T), kind="stable")[:4]
    np.testing.assert_array_equal(hits.ids[0], want)
    assert hits.names[0][0] == captions.names[want[0]]


def retriever_workdir(built):
    return os.path.dirname(os.path.dirname(os.path.dirname(built.indexes["image"])))


def test_reranking_hook_resorts_the_top_m(retriever):
    calls = []

    def reverse(direction, queries, candidates, scores):
        calls.append((direction, queries["input_ids"].shape, candidates.shape))
        return -scores  # the worst of the top M first

    plain = retriever.search_text(["a red circle"], k=6)
    retriever.reranker, retriever.rerank_top = reverse, 4
    try:
        reranked = retriever.search_text(["a red circle"], k=6)
    finally:
        retriever.reranker, retriever.rerank_top = None, 0
    assert calls[0][0] == "text_to_image" and calls[0][2] == (1, 4)
    np.testing.assert_array_equal(reranked.ids[0, :4], plain.ids[0, :4][::-1])
    np.testing.assert_array_equal(reranked.ids[0, 4:], plain.ids[0, 4:])


def test_interrupted_extraction_resumes(workdir, built, tmp_path, monkeypatch):
    config = workdir_lib.load_config(workdir)
    dataset = index_build.open_dataset(config)
    corpus = extract.image_corpus(dataset.split("test"), "test", config)
    normalize = bool(config.loss.normalize)  # as the index build extracted them
    model, params = pretrained.load_dual_encoder(os.path.join(workdir, "model"))
    from ldot_jax.core import parallel
    mesh = parallel.make_mesh()
    out = str(tmp_path / "images")
    real_write = extract._write_shard
    written = []

    def crash_after_two(path, arrays):
        if len(written) == 2:
            raise KeyboardInterrupt("simulated interruption")
        written.append(os.path.basename(path))
        real_write(path, arrays)

    monkeypatch.setattr(extract, "_write_shard", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        extract.extract(model, params, corpus, out, mesh, "sha256:m", shard_size=5,
                        normalize=normalize, progress=False)
    assert sorted(os.listdir(out)) == ["manifest.json", "shard-00000.npz", "shard-00001.npz"]
    with pytest.raises(FileNotFoundError, match="shard 2 .* missing or partial"):
        extract.read_embeddings(out)
    written.clear()
    monkeypatch.setattr(extract, "_write_shard", lambda p, a: (written.append(
        os.path.basename(p)), real_write(p, a)))
    resumed = extract.extract(model, params, corpus, out, mesh, "sha256:m", shard_size=5,
                              normalize=normalize, progress=False)
    assert written == ["shard-00002.npz", "shard-00003.npz"]  # only the missing ones
    full = extract.read_embeddings(built.embeddings["image"])
    np.testing.assert_allclose(resumed.vectors, full.vectors, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(resumed.ids, np.arange(16))
    with pytest.raises(ValueError, match="fingerprint: 'sha256:m' there, 'sha256:other' now"):
        extract.extract(model, params, corpus, out, mesh, "sha256:other", shard_size=5,
                        progress=False)


BUILD = """
import sys
from ldot_jax.retrieval import index_build
index_build.build_from_workdir(sys.argv[1], shard_size=5, progress=False)
"""


def test_an_extraction_killed_in_a_shard_write_resumes_from_its_whole_shards(workdir, built,
                                                                              tmp_path):
    """A real SIGKILL while the second image shard is being written: the shard is not there
    (its temporary is), reading says which shard is missing, and the next build writes only
    what is missing, removes the temporary and gives the full extraction's vectors."""
    import shutil
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(os.path.join(workdir, workdir_lib.CONFIG_FILE), run)
    shutil.copytree(os.path.join(workdir, workdir_lib.MODEL_DIR), run / workdir_lib.MODEL_DIR)
    faults.kill_at("shard_before_rename#2", [run], tmp_path, BUILD)
    images = workdir_lib.embeddings_dir(str(run), "test", "image")
    left = sorted(os.listdir(images))
    assert left[:2] == [".shard-00001.npz.tmp-" + left[0].split(".tmp-")[1], extract.MANIFEST]
    assert left[2:] == ["shard-00000.npz"]
    with pytest.raises(FileNotFoundError, match=r"shard 1 \(rows 5–10\) is missing"):
        extract.read_embeddings(images)
    again = index_build.build_from_workdir(str(run), shard_size=5, progress=False)
    assert sorted(os.listdir(images)) == [extract.MANIFEST] + [
        f"shard-{s:05d}.npz" for s in range(4)]
    for side in ("image", "text"):
        got = extract.read_embeddings(again.embeddings[side])
        want = extract.read_embeddings(built.embeddings[side])
        np.testing.assert_allclose(got.vectors, want.vectors, rtol=1e-5, atol=1e-6)
        assert got.names == want.names


def test_index_from_another_model_is_refused(workdir, built, tmp_path):
    config = workdir_lib.load_config(workdir)
    other = _model_dir(tmp_path / "other", config, seed=1)
    with pytest.raises(index_base.FingerprintMismatchError, match="was built from model"):
        Retriever.load(workdir, model_dir=other)
    forced = Retriever.load(workdir, model_dir=other, force=True)
    assert forced.search_text(["a red circle"], k=2).ids.shape == (1, 2)


def test_command_line_build_info_and_query(workdir, built, tmp_path, capsys):
    out = str(tmp_path / "hier")
    assert cli.main(["build", "--workdir", workdir, "--backend", "hierarchical", "--d_low", "8",
                     "--sides", "image", "--out", out, "--no_progress"]) == 0
    printed = capsys.readouterr().out
    assert "image index:" in printed and "health (80 text queries vs exact)" in printed
    assert cli.main(["info", os.path.join(out, "image")]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["type"] == "hierarchical" and info["params"]["d_low"] == 8
    assert cli.main(["query", "--workdir", workdir, "--index_dir", out, "--text",
                     "a red circle", "-k", "3"]) == 0
    printed = capsys.readouterr().out
    assert "query: a red circle" in printed and printed.count(" image ") == 3
    assert "timings (ms)" in printed
    assert cli.main(["query", "--workdir", workdir, "--image", "test_000004", "-k", "2"]) == 0
    printed = capsys.readouterr().out
    assert "query: image 4 (test_000004)" in printed and printed.count(" caption ") == 2
    assert not glob.glob(os.path.join(str(tmp_path), ".*tmp*"))


def test_command_line_recall_targeted_build(workdir, built, tmp_path, capsys):
    """`--target_recall` on the caption index (80 captions; a forced 8-leaf tree with hashing
    searching 1 leaf, so that settings must be chosen): tuned on 8 images, health on the 8
    others, the choice stored in index.json and used by the reloaded index."""
    out = str(tmp_path / "tuned")
    assert cli.main(["build", "--workdir", workdir, "--sides", "text", "--out", out,
                     "--num_leaves", "8", "--leaves_to_search", "1", "--hashing", "true",
                     "--training_sample_size", "80", "--health_queries", "8",
                     "--target_recall", "0.9", "--target_k", "5", "--no_progress"]) == 0
    printed = capsys.readouterr().out
    assert "tuning: recall@5" in printed and "meets the target 0.9" in printed
    index = index_base.read_metadata(os.path.join(out, "text"))
    tuned, params = index["info"]["tuning"], index["params"]
    assert tuned["met"] and tuned["queries"] == 8 and tuned["query_side"] == "image"
    assert tuned["chosen"]["recall"] >= 0.9 and tuned["probes"]
    assert params["leaves_to_search"] == tuned["chosen"]["leaves_to_search"]
    assert params["reorder"] == tuned["chosen"]["depth"]
    assert index["info"]["health"]["queries"] == 8  # the other half of the 16 images
