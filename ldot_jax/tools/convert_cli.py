"""`ldot convert`: a LightningDOT / UNITER / BERT PyTorch checkpoint → a model directory.

    ldot convert --kind lightningdot --input flickr-ft.pt --output /ckpt/flickr
"""

from __future__ import annotations

import argparse
import logging
import sys

from ldot_jax.checkpoints import convert, kinds, pretrained


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="ldot convert",
        description="Convert a LightningDOT / UNITER / BERT PyTorch checkpoint to ldot_jax.")
    parser.add_argument("--kind", required=True, choices=kinds.NAMES)
    parser.add_argument("--input", required=True, help=".pt / .bin / .pth or .npz state_dict")
    parser.add_argument("--output", required=True, help="model directory to write")
    parser.add_argument("--num_heads", "--num-heads", type=int, default=None,
                        help="attention heads (default: hidden size / 64)")
    parser.add_argument("--trust_pickle", "--trust-pickle", action="store_true",
                        help="allow arbitrary pickled objects in a .pt file you trust")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        out = convert.convert_checkpoint(args.kind, args.input, args.output, args.num_heads,
                                 args.trust_pickle)
    except (ValueError, OSError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    kind, config, _ = pretrained.read_config(out)
    print(f"wrote {kind} model ({pretrained.describe(config)}) to {out}")
    return 0
