"""ldot bench {data,images,train,search,scann_rule,two_stage,serve,accelerator} [flags]: runs
one benchmark (see ldot_jax/bench/)."""

import importlib
import sys


BENCHMARKS = {"data": "ldot_jax.bench.data", "images": "ldot_jax.bench.images",
              "train": "ldot_jax.bench.train",
              "search": "ldot_jax.bench.search", "scann_rule": "ldot_jax.bench.scann_rule",
              "two_stage": "ldot_jax.bench.two_stage", "serve": "ldot_jax.bench.serve",
              "accelerator": "ldot_jax.bench.accelerator"}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in BENCHMARKS:
        print(f"usage: ldot bench {{{','.join(BENCHMARKS)}}} [flags]",
              file=sys.stderr)
        return 2
    return importlib.import_module(BENCHMARKS[argv[0]]).main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
