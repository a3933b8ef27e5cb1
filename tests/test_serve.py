"""The HTTP service (tools/serving) over a real socket on 127.0.0.1: search, embed, items, health,
info and metrics end to end against the Retriever's own answers; every bad request a 400
naming the field while the service goes on; concurrent clients merged into shared batches with
no compile after warm-up; a full queue 503; shutdown finishing the requests in flight."""

import base64
import concurrent.futures
import http.client
import json
import os
import pathlib
import re
import shutil
import subprocess
import threading
import time

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("starlette")
uvicorn = pytest.importorskip("uvicorn")

from ldot_jax.retrieval import batcher as batcher_lib  # noqa: E402
from ldot_jax.retrieval import encode, gallery  # noqa: E402
from ldot_jax.retrieval.retriever import Retriever  # noqa: E402
from ldot_jax.tools.serving import app, requests  # noqa: E402

import gallery_fixtures  # noqa: E402
from gallery_fixtures import HERE  # noqa: E402

pytestmark = pytest.mark.xdist_group("test_serve")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    model = gallery_fixtures.clip_model(tmp_path_factory.mktemp("clip"))
    root, jsonl, rows = gallery_fixtures.pictures(tmp_path_factory.mktemp("photos"))
    out = tmp_path_factory.mktemp("gallery") / "photos"
    gallery.build_gallery(model, jsonl, str(out), backend="exact", workers=1, progress=False)
    return model, out, root, rows


class Running(app.Background):
    """The service on a free port of 127.0.0.1, with a JSON client."""

    def request(self, method, path, body=None, raw=None):
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        data = raw if raw is not None else (None if body is None else json.dumps(body))
        connection.request(method, path, body=data,
                           headers={"content-type": "application/json"})
        response = connection.getresponse()
        payload = response.read()
        connection.close()
        kind = response.getheader("content-type", "")
        return response.status, (json.loads(payload) if "json" in kind else payload)


@pytest.fixture(scope="module")
def running(built):
    model, out, _, _ = built
    retriever = Retriever.from_dirs(model, str(out))
    service = app.Service(retriever, requests.Limits(max_queries=8, max_k=50),
                          max_wait_ms=30, model_dir=model)
    service.warmup()
    server = Running(service)
    yield server
    server.stop()


def _picture(path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def test_search_and_embed_equal_the_retriever(running, built):
    model, out, root, rows = built
    retriever = running.service.retriever
    status, payload = running.request("POST", "/search",
                                      {"text": ["a red square", "a dog"], "k": 4})
    assert status == 200, payload
    direct = retriever.search_text(["a red square", "a dog"], k=4)
    assert [[h["id"] for h in row] for row in payload["results"]] == direct.ids.tolist()
    np.testing.assert_allclose([[h["score"] for h in row] for row in payload["results"]],
                               direct.scores, atol=1e-5)
    first = payload["results"][0][0]
    assert first["key"] == rows[first["id"]]["id"] and first["name"] == rows[first["id"]]["name"]
    assert first["picture"] == f"/items/{first['id']}/picture"
    assert set(payload["timings_ms"]) >= {"encode", "search", "rerank", "total"}
    # Filters through HTTP.
    status, payload = running.request("POST", "/search", {"text": ["a red square"], "k": 9,
                                                          "where": {"source": "flickr"}})
    assert status == 200 and payload["filter"]["mode"] == "subset"
    assert {h["id"] for h in payload["results"][0]} == {1, 3, 5, 7}
    # Image queries: a picture file → captions; a gallery item's stored vector → captions.
    picture = root / rows[2]["image"]
    status, payload = running.request("POST", "/search", {"image": [{"picture": _picture(
        picture)}], "k": 3})
    assert status == 200, payload
    query = gallery.image_file_input(retriever.model.config, str(picture))
    want = retriever.search_image([query], k=3)
    assert [h["id"] for h in payload["results"][0]] == want.ids[0].tolist()
    status, by_item = running.request("POST", "/search", {"item": 2, "k": 3})
    assert status == 200 and by_item["results"] == payload["results"]
    status, payload = running.request("POST", "/embed", {"text": ["a dog"]})
    assert status == 200
    np.testing.assert_allclose(payload["vectors"], retriever.encode_text(["a dog"]), atol=1e-6)
    # The page and the pictures it shows.
    status, page = running.request("GET", "/")
    assert status == 200 and b"ldot_jax search" in page
    status, data = running.request("GET", "/items/2/picture")
    assert status == 200 and data == picture.read_bytes()
    assert running.request("GET", "/items/99/picture")[0] == 404


def test_bad_requests_are_named_and_the_service_goes_on(running):
    long = "a" * 1001
    picture = {"picture": _picture(HERE / "images" / "square_32.png")}
    cases = [
        (None, b"{not json", "body: not JSON"),
        (None, b"[1, 2]", "body: expected a JSON object, got list"),
        ({"text": []}, None, "text: expected a non-empty list"),
        ({"text": ["a", " "]}, None, r"text[1]: empty caption"),
        ({"text": [long]}, None, "text[0]: 1001 characters, at most 1000"),
        ({"text": ["a"] * 9}, None, "text: 9 queries, at most 8"),
        ({"text": ["a"], "k": 0}, None, "k=0: expected 1 ≤ k ≤ 50"),
        ({"text": ["a"], "k": 51}, None, "k=51"),
        ({"text": ["a"], "k": "5"}, None, "k: expected an integer, got '5'"),
        ({"text": ["a"], "where": {"colour": "red"}}, None, "unknown field 'colour'"),
        ({"text": ["a"], "where": {"id": [1000]}}, None, "ids not in the index: [1000]"),
        ({"text": ["a"], "where": []}, None, "where: expected a non-empty object"),
        ({"text": ["a"], "image": [picture]}, None, "expected one of"),
        ({"txt": ["a"]}, None, "txt: unknown field"),
        ({"image": [{"region_feat": [[0.0]]}]}, None, "image[0].picture: expected the base64"),
        ({"image": [{"picture": "@@@"}]}, None, "image[0].picture: not base64"),
        ({"image": [{"picture": base64.b64encode(b"not a png").decode()}]}, None,
         "image[0].picture:"),
        ({"item": "2"}, None, "item: expected an item id"),
        ({"item": 123}, None, "123"),
        ({"item": 10 ** 30}, None, "item: expected an item id"),
        ({"text": ["a"], "where": {"id": [10 ** 30]}}, None, "expected integer ids"),
        ({"text": ["a"], "where": {"id": [2.5]}}, None, "expected integer ids"),
        ({"text": ["a"], "where": {"year": 10 ** 20}}, None, "is not a string, a finite"),
        ({"text": ["a"], "where": {"key": [["p1"]]}}, None, "expected gallery keys"),
    ]
    for body, raw, message in cases:
        status, payload = running.request("POST", "/search", body, raw)
        assert status == 400, (body, raw, payload)
        assert message in payload["error"], (message, payload["error"])
    for method, path, body, message in [
            ("POST", "/embed", {"text": ["a"], "image": []}, "exactly one of"),
            ("POST", "/items", {"items": []}, "items: expected a non-empty list"),
            ("POST", "/items", {"items": [{"key": "", "image": picture}]}, "items[0].key"),
            ("POST", "/items", {"items": [{"key": "n", "image": picture,
                                           "fields": {"tags": [1]}}]}, "list field"),
            ("POST", "/items", {"items": [{"key": "p0", "image": picture}]}, "already"),
            ("DELETE", "/items", {"keys": ["nope"]}, "keys not in the gallery"),
            ("DELETE", "/items", {"ids": [1, "2"]}, "ids: expected a non-empty list of int"),
            ("DELETE", "/items", {"ids": [10 ** 30]}, "ids: expected a non-empty list of int")]:
        status, payload = running.request(method, path, body)
        assert status == 400 and message in payload["error"], (path, body, payload)
    # A search the service's batcher cannot group (a where with odd keys) fails alone.
    odd = running.service.batcher.submit(batcher_lib.Search("text_to_image", ["a"], 3, None,
                                                            {1: "a", "b": 2}))
    with pytest.raises(ValueError, match="unknown field"):
        odd.result(timeout=60)
    status, payload = running.request("POST", "/search", {"text": ["a red square"]})
    assert status == 200 and len(payload["results"][0]) == 9
    status, metrics = running.request("GET", "/metrics")
    assert status == 200 and b'ldot_requests_total{endpoint="search",status="400"}' in metrics


def test_concurrent_clients_share_batches_and_nothing_compiles(running):
    retriever = running.service.retriever
    compiled = encode.encode_batch._cache_size()
    assert compiled == running.service.compiled_after_warmup
    captions = [f"caption number {i} with {'many ' * (i % 7)}words" for i in range(48)]
    want = np.concatenate([retriever.search_text(captions[i:i + 8], k=3).ids
                           for i in range(0, 48, 8)])
    before = _batch_count(running)

    def client(i):
        status, payload = running.request("POST", "/search", {"text": [captions[i]], "k": 3})
        assert status == 200, payload
        return [h["id"] for h in payload["results"][0]]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        got = list(pool.map(client, range(48)))
    assert got == want.tolist()
    batches = _batch_count(running) - before
    assert batches < 48  # requests arriving together shared encoder batches
    assert encode.encode_batch._cache_size() == compiled  # no recompile under load


def _batch_count(running) -> float:
    text = running.request("GET", "/metrics")[1].decode()
    line = next(x for x in text.splitlines() if x.startswith("ldot_batch_queries_count"))
    return float(line.split()[-1])


def test_items_health_and_info(running, built):
    model, out, root, rows = built
    picture = {"picture": _picture(HERE / "images" / "square_32.png")}
    status, payload = running.request("POST", "/items", {"items": [
        {"key": "new-1", "image": picture, "name": "a new square", "fields": {"source": "mine"}},
        {"key": "new-2", "image": picture}]})
    assert status == 200 and payload["ids"] == [9, 10]
    # Saved: a Retriever loaded from the directories sees them.
    reloaded = Retriever.from_dirs(model, str(out))
    assert len(reloaded.indexes["image"]) == 11 and reloaded.catalogs["image"].keys["new-1"] == 9
    status, payload = running.request("POST", "/search", {"text": ["a"], "k": 5,
                                                          "where": {"source": "mine"}})
    assert [h["id"] for h in payload["results"][0]] == [9]
    status, payload = running.request("DELETE", "/items", {"keys": ["new-1", "new-2"]})
    assert status == 200 and payload["deleted"] == [9, 10]
    assert len(Retriever.from_dirs(model, str(out)).indexes["image"]) == 9
    status, health = running.request("POST", "/health")
    assert status == 200 and health["indexes"]["image"]["health"]["recall@1"] == 1.0
    status, info = running.request("GET", "/info")
    assert status == 200 and info["model"]["fingerprint"].startswith("sha256:")
    assert info["indexes"]["image"] == {**info["indexes"]["image"], "type": "exact", "size": 9}
    assert info["versions"]["jax"] and info["limits"]["max_queries"] == 8


def test_a_full_queue_is_503_and_shutdown_finishes_requests_in_flight(built):
    model, out, _, _ = built
    retriever = Retriever.from_dirs(model, str(out))
    service = app.Service(retriever, requests.Limits(max_queries=4), max_queue=1)
    server = Running(service)
    gate, held = threading.Event(), threading.Event()
    try:
        # The device thread busy with a held job (taken off the queue before the request is
        # sent: while it still waits there, the queue is full already) …
        service.batcher.submit(batcher_lib.Call(lambda: (held.set(), gate.wait())))
        assert held.wait(30)
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            # … one request waits in the queue …
            waiting = pool.submit(server.request, "POST", "/search", {"text": ["a"], "k": 2})
            deadline = time.time() + 30
            while service.batcher.depth < 1:
                assert not waiting.done(), waiting.result()
                assert time.time() < deadline
                time.sleep(0.01)
            # … so the next is turned away.
            status, payload = server.request("POST", "/search", {"text": ["b"]})
            assert status == 503 and "busy" in payload["error"]
            # A shutdown now waits for the request in flight, which then completes.
            stopper = threading.Thread(target=server.stop)
            stopper.start()
            time.sleep(0.3)
            assert not waiting.done()
            gate.set()
            status, payload = waiting.result(timeout=60)
            stopper.join(60)
        assert status == 200 and len(payload["results"][0]) == 2
        with pytest.raises(batcher_lib.Closed):
            service.batcher.submit(batcher_lib.Call(lambda: None))
    finally:
        gate.set()
        if server.thread.is_alive():
            server.stop()


BROWSERS = ("chromium", "chromium-browser", "google-chrome")
ARTIFACTS = pathlib.Path(os.environ.get("LDOT_TEST_ARTIFACTS",
                                        pathlib.Path(__file__).parent.parent / "test-artifacts"))


def _browser():
    found = next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)
    if found is None:
        pytest.skip("no Chromium on this machine (Debian: apt-get install chromium; "
                    ".ci/run installs it)")
    return found


def _headless(browser, *flags, url):
    done = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu",
                           "--disable-dev-shm-usage",
                           "--virtual-time-budget=20000", *flags, url],
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_the_page_in_a_real_browser(running):
    """Headless Chromium loads the page from the service, which runs the query of its link
    (the form's own submit); the rendered DOM holds the service's hits in order, with their
    pictures; a click on a picture lists its captions; a screenshot is kept as a test
    artifact."""
    browser = _browser()
    url = f"http://127.0.0.1:{running.port}/?q=a+red+square&k=4"
    dom = _headless(browser, "--dump-dom", url=url)
    status, payload = running.request("POST", "/search", {"text": ["a red square"], "k": 4})
    want = payload["results"][0]
    assert 'data-state="done"' in dom, dom[-3000:]
    cards = re.findall(r'<div class="hit" data-id="(\d+)"><img src="([^"]+)" alt="([^"]*)">'
                       r'<div class="name">(\d+)\. ([^<]*)</div><div class="score">score '
                       r'(-?[\d.]+)</div>', dom)
    assert [int(c[0]) for c in cards] == [h["id"] for h in want], dom[-3000:]
    assert [c[1] for c in cards] == [h["picture"] for h in want]
    assert [c[4] for c in cards] == [h["name"] for h in want]
    assert [int(c[3]) for c in cards] == [1, 2, 3, 4]
    np.testing.assert_allclose([float(c[5]) for c in cards], [h["score"] for h in want],
                               atol=1e-4)
    assert re.search(r'<div id="timings">encode [\d.]+ ms · search [\d.]+ ms', dom)
    # Picking the second picture (a click on its card) lists the captions the service gives
    # for that gallery item.
    dom = _headless(browser, "--dump-dom", url=url + "&pick=2")
    assert 'data-state="captions"' in dom, dom[-3000:]
    status, captions = running.request("POST", "/search", {"item": want[1]["id"], "k": 5})
    items = re.findall(r"<li>([^<]*) \((-?[\d.]+)\)</li>", dom)
    assert [name for name, _ in items] == [h["name"] for h in captions["results"][0]]
    assert len(items) == 5 and items[0][0].split()[0] in ("caption", "another")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "serve_page.png"
    _headless(browser, "--window-size=1000,700", f"--screenshot={shot}", url=url)
    with Image.open(shot) as image:
        assert image.size == (1000, 700)
        pixels = np.asarray(image.convert("RGB"))
    # The pictures were drawn: far more colours than a page of text on white.
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 500


def test_the_serve_command_starts_answers_and_stops_on_sigterm(built, tmp_path):
    import signal
    import socket
    import sys
    model, out, _, _ = built
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "ldot_jax.tools.cli", "serve", "--model",
                             model, "--index", str(out), "--port", str(port), "--max_batch",
                             "4"], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 240
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            assert time.time() < deadline, "ldot serve did not start"
            try:
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                connection.request("POST", "/search", json.dumps({"text": ["a dog"], "k": 2}))
                response = connection.getresponse()
                body = json.loads(response.read())
                break
            except (ConnectionRefusedError, OSError):
                time.sleep(0.5)
        assert response.status == 200 and len(body["results"][0]) == 2
        proc.send_signal(signal.SIGTERM)
        # uvicorn shuts down gracefully, then re-raises the signal (exit status -SIGTERM).
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    text = (tmp_path / "serve.log").read_text()
    assert "programs compiled; serving on http://127.0.0.1" in text
    assert "Application shutdown complete" in text and "Finished server process" in text


@pytest.fixture(scope="module")
def region_service(tmp_path_factory):
    """A region gallery of 40 items from a tiny random LightningDOT model, with a tiny random
    re-ranker, served."""
    root = tmp_path_factory.mktemp("region_serve")
    models = {stage: gallery_fixtures.random_model(root / stage, stage, seed)
              for stage, seed in (("finetune", 0), ("rerank", 1))}
    vocab = gallery_fixtures.vocab(root / "vocab.txt")
    rng = np.random.default_rng(0)
    (root / "feats").mkdir()
    dim = models["finetune"][1].region.feat_dim
    rows = []
    for i in range(40):
        n = int(rng.integers(2, 7))
        xs, ys = np.sort(rng.uniform(0, 1, (2, n, 2)), axis=2)
        np.savez(root / "feats" / f"{i}.npz", features=rng.normal(size=(n, dim)),
                 boxes=np.stack([xs[:, 0], ys[:, 0], xs[:, 1], ys[:, 1]], 1))
        rows.append({"id": f"r{i}", "features": f"feats/{i}.npz", "half": i % 2})
    jsonl = gallery_fixtures.write_jsonl(root / "regions.jsonl", rows)
    out = root / "gallery"
    gallery.build_gallery(models["finetune"][0], jsonl, str(out), backend="exact",
                          progress=False)
    retriever = Retriever.from_dirs(models["finetune"][0], str(out), tokenizer=str(vocab))
    retriever.reranker = gallery.gallery_reranker(models["rerank"][0],
                                                  retriever.catalogs["image"], 8)
    retriever.rerank_top = 5
    service = app.Service(retriever, requests.Limits(max_queries=8), max_wait_ms=30)
    service.warmup()
    server = Running(service)
    yield server, retriever, out, dim
    server.stop()


def test_reranking_through_the_service(region_service):
    server, retriever, out, dim = region_service
    captions = ["a red circle", "blue square left of a circle", "a square"]
    direct = retriever.search_text(captions, k=5, rerank_top=5)
    plain = retriever.search_text(captions, k=5, rerank_top=0)
    assert not np.array_equal(direct.ids, plain.ids)  # the re-ranker changed the order
    compiles = retriever.reranker.compiles

    def client(i):
        status, payload = server.request("POST", "/search", {"text": [captions[i % 3]],
                                                             "k": 5, "rerank_top": 5})
        assert status == 200, payload
        return [h["id"] for h in payload["results"][0]], payload["timings_ms"]["rerank"]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        got = list(pool.map(client, range(24)))
    for i, (ids, rerank_ms) in enumerate(got):
        assert ids == direct.ids[i % 3].tolist() and rerank_ms > 0
    assert retriever.reranker.compiles == compiles  # no compile under load
    # A region model's image queries: wrong widths, counts or boxes are named.
    boxes7 = [[0.1, 0.1, 0.5, 0.6, 0.4, 0.5, 0.2]]
    for image, message in [
            ({"region_feat": np.ones((1, dim + 1)).tolist(), "boxes": boxes7},
             f"image[0].region_feat: shape [1, {dim + 1}], expected [n ≥ 1, {dim}]"),
            ({"region_feat": np.ones((2, dim)).tolist(), "boxes": boxes7},
             "image[0]: 2 regions but 1 boxes"),
            ({"region_feat": np.ones((1, dim)).tolist(), "boxes": [[0, 0, 40, 30, 40, 30, 1]]},
             "image[0].boxes"),
            ({"region_feat": [[float("nan")] * dim], "boxes": boxes7}, "non-finite"),
            ({"picture": "AAAA"}, "image[0].region_feat: missing (this model reads regions"),
            ({"region_feat": "x", "boxes": boxes7}, "image[0].region_feat: expected a list")]:
        status, payload = server.request("POST", "/search",
                                         raw=json.dumps({"image": [image], "k": 2}))
        assert status == 400 and message in payload["error"], (message, payload)
    # An item added through the API is kept as a file beside the index and re-ranked.
    boxes = [[0.1, 0.1, 0.5, 0.6, 0.4, 0.5, 0.2]] * 3
    status, payload = server.request("POST", "/items", {"items": [{
        "key": "new", "image": {"region_feat": np.ones((3, dim)).tolist(), "boxes": boxes},
        "fields": {"half": 2}}]})
    assert status == 200 and payload["ids"] == [40]
    assert len(list((out / "added").iterdir())) == 1
    status, payload = server.request("POST", "/search", {"text": ["a red circle"], "k": 1,
                                                         "rerank_top": 5,
                                                         "where": {"half": 2}})
    assert status == 200 and [h["id"] for h in payload["results"][0]] == [40]
    assert payload["timings_ms"]["rerank"] > 0
