"""`ldot export`: a model directory from a run's checkpoint (ldot_jax/training/export.py)."""

from __future__ import annotations

import argparse
import logging
import os

from ldot_jax.training import export


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ldot export", description=export.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="the training run")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--step", type=int, help="the checkpoint to export (default: latest)")
    which.add_argument("--best", action="store_true",
                       help="the checkpoint with the best train.best_metric")
    parser.add_argument("--out", help="the model directory to write (default: WORKDIR/model)")
    parser.add_argument("--vocab", help="a vocab.txt (or a saved tokenizer directory) to "
                                        "include instead of the run's own tokenizer")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    tokenizer = None
    if args.vocab:
        from ldot_jax.data import tokenizer as tokenizer_lib
        tokenizer = (tokenizer_lib.Tokenizer.load(args.vocab) if os.path.isdir(args.vocab)
                     else tokenizer_lib.Tokenizer.from_vocab_file(args.vocab))
    path, step = export.export(args.workdir, args.step, args.best, args.out, tokenizer)
    print(f"exported step {step} of {args.workdir} to {path}")
    return 0
