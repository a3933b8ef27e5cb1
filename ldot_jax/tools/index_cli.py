"""ldot index {build,info,query}: the fast stage from the command line.

  build  --workdir DIR [--split test] [--backend scann|hierarchical|exact] [--sides image,text]
         [--d_low 64] [--candidates 100] [--num_leaves N --leaves_to_search N --reorder N]
         [--shard_size 4096] [--health_queries 1000] [--model DIR] [--overwrite]
         [--target_recall 0.95 [--target_k 10]]   the cheapest settings reaching that recall
  build  --model DIR --gallery photos.jsonl|photos/ --out DIR [--bad_images error|skip]
         [--workers N] [index flags as above]      your own gallery, no training run
         (retrieval/gallery.py: the JSONL's keys; Retriever.from_dirs(model, out) queries it)
  info   INDEX_DIR                      what an index holds (its files checked), parameters, health
  query  --workdir DIR --text "a red circle" [--text …] [-k 5]     text → image
  query  --workdir DIR --image 12 [-k 5]      image 12 of the split → captions
  query  --model DIR --index_dir DIR --text "…"  a gallery (or any model + index), no run;
         --image a picture file (or a region .npz) of your own → captions
Defaults come from the run's config (its `index` section); flags override them.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from ldot_jax.core import parallel
from ldot_jax.core import workdir as workdir_lib
from ldot_jax.data import schema
from ldot_jax.index import backends


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ldot index", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="extract embeddings and build the split's indexes")
    b.add_argument("--workdir", help="a training run (its model, dataset and index settings)")
    b.add_argument("--gallery", help="instead of --workdir: a JSONL file listing pictures or "
                                     "region-feature files, or a folder of pictures")
    b.add_argument("--model", help="model directory (default: <workdir>/model)")
    b.add_argument("--out", help="index directory (default: <workdir>/index/<split>)")
    b.add_argument("--bad_images", choices=("error", "skip"), default="error",
                   help="--gallery: pictures that cannot be read stop the build, naming them "
                        "(error) or are left out with a warning (skip)")
    b.add_argument("--workers", type=int, default=0,
                   help="--gallery: processes decoding pictures (0: one per CPU)")
    b.add_argument("--split")
    b.add_argument("--backend", choices=backends.NAMES,
                   help="; ".join(f"{b.name}: {b.summary}" for b in backends.BACKENDS.values()))
    b.add_argument("--sides", help="image, text, or image,text")
    b.add_argument("--d_low", type=int)
    b.add_argument("--candidates", type=int)
    b.add_argument("--shard_size", type=int)
    b.add_argument("--health_queries", type=int)
    b.add_argument("--target_recall", type=float,
                   help="choose the cheapest settings reaching this recall@target_k against "
                        "exact search on held-out queries of the other modality (e.g. 0.95)")
    b.add_argument("--target_k", type=int, help="the k of --target_recall (default 10)")
    for name in ("num_leaves", "leaves_to_search", "training_sample_size", "reorder",
                 "num_threads"):
        b.add_argument(f"--{name}", type=int, help="ScaNN override")
    b.add_argument("--hashing", choices=("true", "false"), help="ScaNN override")
    b.add_argument("--overwrite", action="store_true",
                   help="replace an extraction made with another model or shard size")
    b.add_argument("--no_progress", action="store_true")
    i = sub.add_parser("info", help="check every file of an index (SHA-256) and print its "
                                     "metadata")
    i.add_argument("path")
    q = sub.add_parser("query", help="search from the command line")
    q.add_argument("--workdir")
    q.add_argument("--split")
    q.add_argument("--index_dir")
    q.add_argument("--model")
    group = q.add_mutually_exclusive_group(required=True)
    group.add_argument("--text", action="append", help="a caption (repeatable)")
    group.add_argument("--image", help="an image of the split: its position or its id")
    q.add_argument("-k", type=int, default=5)
    q.add_argument("--force", action="store_true",
                   help="use an index built from another model fingerprint")
    return p


def _build(args) -> int:
    from ldot_jax.retrieval import index_build
    if (args.gallery is None) == (args.workdir is None):
        raise SystemExit("ldot index build: give --workdir (a training run) or --gallery "
                         "(your own pictures, with --model and --out)")
    scann = {name: getattr(args, name) for name in
             ("num_leaves", "leaves_to_search", "training_sample_size", "reorder", "num_threads")
             if getattr(args, name) is not None}
    if args.hashing is not None:
        scann["hashing"] = args.hashing == "true"
    overrides = {"split": args.split, "backend": args.backend, "d_low": args.d_low,
                 "candidates": args.candidates, "shard_size": args.shard_size,
                 "health_queries": args.health_queries, "target_recall": args.target_recall,
                 "target_k": args.target_k,
                 "sides": tuple(args.sides.split(",")) if args.sides else None}
    if args.gallery is not None:
        built = _build_gallery(args, overrides, scann)
    else:
        if scann:
            base = backends.index_options(workdir_lib.load_config(args.workdir))["scann"]
            overrides["scann"] = {**base, **scann}
        built = index_build.build_from_workdir(
            args.workdir, model_dir=args.model, out_dir=args.out, overwrite=args.overwrite,
            progress=not args.no_progress, **overrides)
    for side, path in built.indexes.items():
        print(f"{side} index: {path}")
        report = built.health.get(side, {})
        recalls = ", ".join(f"{k} {v:.3f}" for k, v in report.items() if k.startswith("recall"))
        if recalls:
            print(f"  health ({report['queries']} {report['query_side']} queries vs exact): "
                  f"{recalls}")
        tuned = built.tuning.get(side)
        if tuned:
            chosen = tuned["chosen"]
            print(f"  tuning: recall@{tuned['k']} {chosen['recall']:.3f} at "
                  f"{chosen['qps']:.0f} queries/s on {tuned['queries']} held-out queries "
                  f"({'meets' if tuned['met'] else 'DOES NOT MEET'} the target "
                  f"{tuned['target_recall']})")
    return 0


def _build_gallery(args, overrides: dict, scann: dict):
    from ldot_jax.retrieval import gallery
    if not args.model or not args.out:
        raise SystemExit("ldot index build --gallery: --model (a model directory) and --out "
                         "(where the index goes) are required")
    ignored = [f"--{k}" for k in ("split", "sides") if overrides.get(k) is not None]
    if ignored or args.overwrite:
        raise SystemExit(f"ldot index build --gallery: {', '.join(ignored or ['--overwrite'])} "
                         f"only apply to --workdir builds")
    options = {k: v for k, v in overrides.items() if v is not None and k not in ("split", "sides")}
    if scann:
        options["scann"] = scann
    backend = options.pop("backend", "scann")
    return gallery.build_gallery(args.model, args.gallery, args.out, backend=backend,
                                 bad_images=args.bad_images, workers=args.workers,
                                 progress=not args.no_progress, **options)


def _info(args) -> int:
    from ldot_jax.index.base import read_metadata
    meta = read_metadata(args.path, full=True)  # every file's SHA-256 against its manifest
    meta.pop("files")
    print(json.dumps(meta, indent=1))
    return 0


def _query(args) -> int:
    from ldot_jax.retrieval.retriever import Retriever
    if args.workdir is None:
        if not (args.model and args.index_dir):
            raise SystemExit("ldot index query: give --workdir, or --model and --index_dir")
        retriever = Retriever.from_dirs(args.model, args.index_dir, force=args.force)
    else:
        retriever = Retriever.load(args.workdir, split=args.split, model_dir=args.model,
                                   index_dir=args.index_dir, force=args.force)
    retriever.warmup()
    owners = None
    if args.text:
        results = retriever.search_text(args.text, k=args.k)
        queries = args.text
        kind = "image"
    elif args.workdir is None:
        from ldot_jax.retrieval import gallery
        query = gallery.image_file_input(retriever.model.config, args.image)
        results = retriever.search_image([query], k=args.k)
        queries, kind = [args.image], "caption"
    else:
        from ldot_jax.retrieval import index_build
        config = workdir_lib.load_config(args.workdir)
        split = args.split or backends.index_options(config)["split"]
        images = index_build.open_dataset(config).split(split)
        position = _image_position(images, args.image)
        record = images[position]
        results = retriever.search_image([record], k=args.k)
        queries = [f"image {position} ({schema.as_str(record['image_id'])})"]
        kind = "caption"
        owners = retriever.catalogs.get("text")
    for q, query in enumerate(queries):
        print(f"query: {query}")
        for rank, (i, s, name) in enumerate(zip(results.ids[q], results.scores[q],
                                                results.names[q]), 1):
            mark = ""
            if kind == "caption" and owners is not None and owners.owners.get(int(i)) == position:
                mark = "  ✓ (a caption of this image)"
            print(f"  {rank:>3}  {s:9.4f}  {kind} {i}: {name}{mark}")
    t = results.timings_ms
    print(f"timings (ms): encode {t['encode']}, search {t['search']}, total {t['total']}")
    return 0


def _image_position(images, key: str) -> int:
    if key.isdigit() and int(key) < len(images):
        return int(key)
    for i in range(len(images)):
        if schema.as_str(images[i]["image_id"]) == key:
            return i
    raise ValueError(f"--image {key!r}: neither a position in [0, {len(images)}) nor an image "
                     f"id of the split")


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "build":
        parallel.initialize_distributed()
        return _build(args)
    if args.command == "info":
        return _info(args)
    return _query(args)


if __name__ == "__main__":
    sys.exit(main())
