"""Load test of the search service (`ldot serve`) on this machine: requests per second and
latency (p50 / p99) at 1, 8 and 64 concurrent clients, dot product only and with re-ranking
of the top M = 20, over two indexes:
  demo       the demo's towers and re-ranker (the scenes_small preset; random weights: the speed
             does not depend on them) over a gallery the size of the demo's test split (1,000
             images, up to 16 regions each, read on demand for the re-ranker);
  synthetic  the same towers over 1M synthetic vectors (ScaNN, the size rule).

    ldot bench serve [--clients 1,8,64] [--requests 400] [--duration 20] [--synthetic 1000000]
        [--out runs/bench/serve]

The service runs in this process on 127.0.0.1 (a free port) with its dynamic batcher
(max_batch 32, max_wait 5 ms), warmed up first. Each client thread sends one caption per
request (k = 10, captions of the scenes grammar) back to back on its own keep-alive
connection, until the run has sent --requests requests or --duration seconds have passed:
the generator stops by itself, and then the service. Writes serve.{json,md}.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import threading
import time

import jax
import numpy as np

from ldot_jax.core import fileutil

REGIONS, M = 16, 20


def _captions(count: int) -> list[str]:
    from ldot_jax.data import scenes
    rng = np.random.default_rng(0)
    out = []
    while len(out) < count:
        out += scenes.captions(scenes.sample_objects(rng, 4), 2, rng)
    return out[:count]


def _retriever(size: int, captions: list[str]):
    """A Retriever over `size` image vectors with the demo preset's towers and re-ranker."""
    from ldot_jax.bench.two_stage import GeneratedRecords, _models
    from ldot_jax.data.tokenizer import Tokenizer
    from ldot_jax.index.scann_index import ScannIndex
    from ldot_jax.retrieval import rerank
    from ldot_jax.retrieval.retriever import Catalog, Retriever
    (dual, dual_params), (cross, cross_params), cfg = _models("scenes_small")
    tokenizer = Tokenizer.from_words(captions, cfg.text.vocab_size)
    rng = np.random.default_rng(1)
    index = ScannIndex(cfg.project_dim)
    index.add(rng.standard_normal((size, cfg.project_dim), dtype=np.float32), np.arange(size))
    images = rerank.RecordImageStore(GeneratedRecords(size, REGIONS, cfg.region.feat_dim),
                                     REGIONS)
    # 64 pairs per call: three requests' M = 20 candidates fill one.
    reranker = rerank.CrossEncoderReranker(cross, cross_params, images, pairs_per_batch=64,
                                           text_buckets=(16, 24))
    catalog = Catalog(np.arange(min(size, 1000)), [f"image {i}" for i in range(min(size,
                                                                                 1000))])
    return Retriever(dual, dual_params, tokenizer, index, None, {"image": catalog},
                     text_buckets=(16, 24), reranker=reranker, rerank_top=0)


def load(port: int, captions: list[str], clients: int, requests: int, duration: float,
         rerank_top: int) -> dict:
    """Runs the clients against 127.0.0.1:port; returns QPS, latency percentiles (ms) and
    the count of requests and errors."""
    lock = threading.Lock()
    sent, latencies, errors = [0], [], [0]
    deadline = time.perf_counter() + duration

    def client(c: int):
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        while True:
            with lock:
                if sent[0] >= requests or time.perf_counter() > deadline:
                    break
                n = sent[0]
                sent[0] += 1
            body = json.dumps({"text": [captions[n % len(captions)]], "k": 10,
                               "rerank_top": rerank_top})
            start = time.perf_counter()
            connection.request("POST", "/search", body,
                               {"content-type": "application/json"})
            response = connection.getresponse()
            response.read()
            elapsed = time.perf_counter() - start
            with lock:
                latencies.append(elapsed)
                if response.status != 200:
                    errors[0] += 1
        connection.close()
    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ms = np.asarray(latencies) * 1000
    return {"clients": clients, "requests": len(latencies), "errors": errors[0],
            "seconds": round(wall, 2), "qps": round(len(latencies) / wall, 1),
            "p50_ms": round(float(np.percentile(ms, 50)), 2),
            "p99_ms": round(float(np.percentile(ms, 99)), 2)}


def run(sizes: dict, clients, requests: int, duration: float) -> dict:
    from ldot_jax.tools.serving import app
    captions = _captions(512)
    rows = []
    for name, size in sizes.items():
        start = time.perf_counter()
        retriever = _retriever(size, captions)
        build_s = time.perf_counter() - start
        service = app.Service(retriever)
        service.warmup()
        server = app.Background(service)
        try:
            for m in (0, M):
                for c in clients:
                    row = {"index": name, "size": size, "rerank_top": m,
                           **load(server.port, captions, c, requests, duration, m)}
                    rows.append(row)
                    print(_line(row), flush=True)
        finally:
            server.stop()
        rows[-1]["build_s"] = round(build_s, 1)
    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
               f"jax {jax.__version__} {jax.default_backend()}")
    return {"machine": machine, "requests": requests, "duration_s": duration, "rows": rows}


def _line(row: dict) -> str:
    mode = f"re-rank M = {row['rerank_top']}" if row["rerank_top"] else "dot only"
    return (f"| {row['index']} ({row['size']:,}) | {mode} | {row['clients']} | "
            f"{row['qps']} | {row['p50_ms']} | {row['p99_ms']} | {row['requests']} | "
            f"{row['errors']} |")


def markdown(result: dict) -> str:
    head = ("| index (images) | mode | clients | requests / s | p50 ms | p99 ms | requests | "
            "errors |\n|---|---|---|---|---|---|---|---|")
    return "\n".join([f"Machine: {result['machine']}.", "", head] +
                     [_line(r) for r in result["rows"]]) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="ldot bench serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", default="1,8,64")
    p.add_argument("--requests", type=int, default=400, help="requests per run at most")
    p.add_argument("--duration", type=float, default=20.0, help="seconds per run at most")
    p.add_argument("--demo", type=int, default=1000, help="images of the demo-sized index")
    p.add_argument("--synthetic", type=int, default=1_000_000,
                   help="vectors of the synthetic index (0: skip it)")
    p.add_argument("--out", default="runs/bench/serve")
    args = p.parse_args(argv)
    sizes = {"demo": args.demo}
    if args.synthetic:
        sizes["synthetic"] = args.synthetic
    result = run(sizes, [int(c) for c in args.clients.split(",")], args.requests,
                 args.duration)
    os.makedirs(args.out, exist_ok=True)
    fileutil.atomic_write_text(os.path.join(args.out, "serve.json"),
                               json.dumps(result, indent=1))
    fileutil.atomic_write_text(os.path.join(args.out, "serve.md"), markdown(result))
    print(markdown(result))
    return 0
