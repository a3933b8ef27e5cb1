"""`ldot convert`: a LightningDOT / UNITER / BERT / open_clip PyTorch checkpoint → a model
directory.

    ldot convert --kind lightningdot --input flickr-ft.pt --output /ckpt/flickr
    ldot convert --kind open_clip --input clip.bin --output /ckpt/clip --activation quick_gelu
"""

from __future__ import annotations

import argparse
import logging
import sys

from ldot_jax.checkpoints import convert, kinds, pretrained


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="ldot convert",
        description="Convert a LightningDOT / UNITER / BERT / open_clip PyTorch checkpoint to "
                    "ldot_jax.")
    parser.add_argument("--kind", required=True, choices=kinds.NAMES)
    parser.add_argument("--input", required=True, help=".pt / .bin / .pth or .npz state_dict")
    parser.add_argument("--output", required=True, help="model directory to write")
    parser.add_argument("--num_heads", "--num-heads", type=int, default=None,
                        help="attention heads (default: hidden size / 64)")
    parser.add_argument("--activation", choices=("gelu", "quick_gelu"), default=None,
                        help="open_clip: the MLP activation, which its files do not record "
                             "(quick_gelu: OpenAI's weights and the *-quickgelu models)")
    parser.add_argument("--text_num_heads", "--text-num-heads", type=int, default=None,
                        help="open_clip: the text tower's heads (default width / 64; "
                             "--num_heads is the image tower's)")
    parser.add_argument("--pool", choices=("tok", "avg"), default=None,
                        help="open_clip: the image vector's pool (default tok, the class "
                             "token)")
    parser.add_argument("--image_size", "--image-size", type=int, default=None,
                        help="open_clip: convert for pictures of this size (a multiple of the "
                             "patch): the position embeddings are resized bicubically")
    parser.add_argument("--trust_pickle", "--trust-pickle", action="store_true",
                        help="allow arbitrary pickled objects in a .pt file you trust")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        out = convert.convert_checkpoint(args.kind, args.input, args.output, args.num_heads,
                                         args.trust_pickle, activation=args.activation,
                                         text_num_heads=args.text_num_heads, pool=args.pool,
                                         image_size=args.image_size)
    except (ValueError, OSError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    kind, config, _ = pretrained.read_config(out)
    print(f"wrote {kind} model ({pretrained.describe(config)}) to {out}")
    return 0
