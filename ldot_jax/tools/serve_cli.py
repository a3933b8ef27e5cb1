"""`ldot serve`: a model directory and an index directory as an HTTP search service.

    ldot index build --model models/clip --gallery photos.jsonl --out galleries/photos
    ldot serve --model models/clip --index galleries/photos --port 8080
    curl -s localhost:8080/search -d '{"text": ["a dog on a beach"], "k": 5}'

Open http://127.0.0.1:8080/ for the search page. Needs the `serve` extra
(pip install 'ldot_jax[serve]'). See tools/serving/app.py for the endpoints.
"""

from __future__ import annotations

import argparse
import logging
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="ldot serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model directory (with its tokenizer)")
    p.add_argument("--index", required=True,
                   help="index directory: a gallery (`ldot index build --gallery`), a run's "
                        "index/<split>, or one index")
    p.add_argument("--tokenizer", help="a vocab.txt or tokenizer directory, for a model "
                                       "directory without one")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--max_batch", type=int, default=32,
                   help="queries per encoder batch and per request (a power of two)")
    p.add_argument("--max_wait_ms", type=float, default=5.0,
                   help="how long a request waits for others to share its batch")
    p.add_argument("--max_queue", type=int, default=256, help="waiting requests; more: 503")
    p.add_argument("--max_k", type=int, default=1000)
    p.add_argument("--reranker", help="a re-ranker model directory (uniter_itm): re-scores "
                                      "the top --rerank_top images of caption queries")
    p.add_argument("--rerank_top", type=int, default=20,
                   help="with --reranker: candidates re-scored per query (a request's "
                        "rerank_top overrides it; 0: none)")
    p.add_argument("--region_bucket", type=int, default=100,
                   help="with a region re-ranker: the regions candidates are padded to")
    p.add_argument("--force", action="store_true",
                   help="serve an index built from another model fingerprint")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        from ldot_jax.tools.serving import app, requests
    except ImportError as e:
        print(f"error: {e}; `ldot serve` needs the serve extra: pip install "
              f"'ldot_jax[serve]'", file=sys.stderr)
        return 2
    from ldot_jax.retrieval.retriever import Retriever
    retriever = Retriever.from_dirs(args.model, args.index, tokenizer=args.tokenizer,
                                    force=args.force)
    if args.reranker:
        from ldot_jax.retrieval import gallery
        if not retriever.catalogs["image"].paths:
            print(f"error: --reranker reads the candidates from the files a gallery lists; "
                  f"{args.index} is not a gallery (ldot index build --gallery)",
                  file=sys.stderr)
            return 2
        retriever.reranker = gallery.gallery_reranker(args.reranker, retriever.catalogs["image"],
                                                      args.region_bucket)
        retriever.rerank_top = args.rerank_top
    limits = requests.Limits(max_queries=args.max_batch, max_k=args.max_k)
    service = app.Service(retriever, limits, args.max_wait_ms, args.max_queue,
                          model_dir=args.model)
    logging.info("compiling the encoders for every batch shape …")
    programs = service.warmup()
    logging.info("%d programs compiled; serving on http://%s:%d/", programs, args.host,
                 args.port)
    app.serve(service, args.host, args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
