"""`ldot`: one command for everything the README runs.

    ldot train    --config=ldot_jax/configs/demo.py:finetune --workdir=runs/ft   training
    ldot convert  --kind lightningdot --input ft.pt --output models/ft            PyTorch → model dir
    ldot export   --workdir runs/ft [--step N | --best] [--out DIR]               checkpoint → model dir
    ldot index    build|info|query ...                                           indexes
    ldot serve    --model DIR --index DIR [--port 8080]                          HTTP search
    ldot export-serving MODEL_DIR OUT [--reranker DIR]                           jax.export programs
    ldot evaluate --workdir runs/ft --reranker runs/rr/model                     two-stage report
    ldot mine     --workdir runs/ft --out mined.npz                              hard negatives
    ldot demo     [--tiny] [--workdir runs/demo]                                 the demo
    ldot launch   --processes 2 -- --config=... --workdir=...                    local multi-process
    ldot bench    data|train|search|two_stage ...                                benchmarks

Flags are spelled with underscores everywhere (`--max_queries`, `--num_heads`).
`ldot COMMAND --help` shows a command's flags. Each command imports only what it runs.
"""

from __future__ import annotations

import importlib
import sys


# command → the module whose main(argv) runs it (imported on demand: `ldot --help` stays fast).
COMMANDS = {
    "train": "ldot_jax.tools.train_cli",
    "convert": "ldot_jax.tools.convert_cli",
    "export": "ldot_jax.tools.export_cli",
    "index": "ldot_jax.tools.index_cli",
    "serve": "ldot_jax.tools.serve_cli",
    "export-serving": "ldot_jax.tools.export_serving_cli",
    "evaluate": "ldot_jax.tools.evaluate_cli",
    "mine": "ldot_jax.tools.mine_cli",
    "demo": "ldot_jax.tools.demo",
    "launch": "ldot_jax.tools.launch",
    "bench": "ldot_jax.bench.__main__",
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"ldot: unknown command {command!r}; the commands are {', '.join(COMMANDS)}",
              file=sys.stderr)
        return 2
    return int(importlib.import_module(COMMANDS[command]).main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
