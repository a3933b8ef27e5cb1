"""`ldot mine`: hard negatives from the index over a whole split (ldot_jax/training/mine.py)."""

from __future__ import annotations

import argparse
import logging
import sys

from ldot_jax.training import mine


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ldot mine", description=mine.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="the dual encoder's training run")
    parser.add_argument("--out", required=True, help="the .npz to write")
    parser.add_argument("--split", default="train")
    parser.add_argument("--k", type=int, default=20, help="negatives kept per image")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    done = mine.mine_workdir(args.workdir, args.out, args.split, args.k,
                        progress=sys.stderr.isatty())
    print(f"{done['path']}: {done['k']} negatives for each of {done['images']:,} "
          f"{args.split} images ({done['short']} with fewer), {done['seconds']:.0f} s")
    return 0
