"""`ldot evaluate`: the two-stage evaluation of a run (ldot_jax/evaluation/two_stage.py; the
table and the files it writes: ldot_jax/evaluation/report.py)."""

from __future__ import annotations

import argparse
import logging

from ldot_jax.evaluation import report as report_lib
from ldot_jax.evaluation import two_stage
from ldot_jax.index import backends


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="ldot evaluate", description=two_stage.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="the dual encoder's training run")
    parser.add_argument("--reranker", help="the cross-encoder's model directory")
    parser.add_argument("--split", default="test")
    parser.add_argument("--ms", default=",".join(map(str, two_stage.MS)),
                        help="re-ranking depths, comma-separated")
    parser.add_argument("--max_queries", type=int, help="a seeded sample of caption queries")
    parser.add_argument("--max_image_queries", type=int, help="… and of image queries")
    parser.add_argument("--alpha_split", help="choose the fusion weight α on this split")
    parser.add_argument("--backend", choices=backends.NAMES)
    parser.add_argument("--out", help="output directory (default <workdir>/eval/<split>)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    report, paths = two_stage.evaluate_workdir(
        args.workdir, args.reranker, args.split, tuple(int(m) for m in args.ms.split(",")),
        args.max_queries, args.max_image_queries, args.alpha_split, backend=args.backend,
        out_dir=args.out)
    print(report_lib.table(report))
    print("written: " + ", ".join(paths.values()))
    return 0
