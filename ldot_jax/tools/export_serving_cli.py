"""`ldot export-serving MODEL_DIR OUT [--reranker DIR]`: the towers (and the re-ranker) as
jax.export programs that a process with only jax and numpy runs (retrieval/exported.py; OUT
holds loader.py: `python OUT/loader.py OUT` runs each program once)."""

from __future__ import annotations

import argparse
import logging
import sys


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(","))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="ldot export-serving", description=__doc__)
    p.add_argument("model", help="a dual-encoder model directory")
    p.add_argument("out", help="the export directory to write")
    p.add_argument("--reranker", help="a re-ranker model directory (uniter_itm)")
    p.add_argument("--text_buckets", type=_ints, default=(16, 24, 32, 48, 64),
                   help="padded text lengths, comma-separated")
    p.add_argument("--region_buckets", type=_ints, default=(16, 36, 64, 100),
                   help="padded region counts (region towers), comma-separated")
    p.add_argument("--rerank_regions", type=int, help="the re-ranker's region count")
    p.add_argument("--platforms", default="cpu,cuda,tpu",
                   help="the platforms the programs are lowered for")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from ldot_jax.retrieval import exported
    try:
        import flatbuffers  # noqa: F401  (jax.export's serialization)
    except ImportError:
        print("error: jax.export's serialization needs the flatbuffers package",
              file=sys.stderr)
        return 2
    out = exported.export_serving(args.model, args.out, args.reranker, args.text_buckets,
                                  args.region_buckets, args.rerank_regions,
                                  tuple(args.platforms.split(",")))
    print(f"wrote the serving programs of {args.model} to {out} (run them with "
          f"{out}/loader.py)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
