"""Experiment configs: `get_config(arg)` files for ml_collections (`--config` takes a file path
or a packaged name such as `ldot_jax/configs/demo.py:finetune`)."""

from __future__ import annotations


import os


PACKAGE_PREFIX = "ldot_jax/configs/"
_HERE = os.path.dirname(os.path.abspath(__file__))


def resolve(spec: str) -> str:
    """`path.py[:arg]` → the same with the path made absolute when it names a packaged config
    (`ldot_jax/configs/demo.py:finetune`, or `demo.py:finetune`) that does not exist relative to
    the working directory. Any other path is returned unchanged (ml_collections reports it)."""
    path, sep, arg = spec.partition(":")
    if os.path.exists(path):
        return spec
    name = path[len(PACKAGE_PREFIX):] if path.startswith(PACKAGE_PREFIX) else path
    packaged = os.path.join(_HERE, name)
    if os.sep not in name and os.path.isfile(packaged):
        return packaged + sep + arg
    return spec


def repeated_overrides(argv: list[str]) -> list[str]:
    """The `--config.KEY` overrides that `argv` gives more than once, in order of first use.

    Why: ml_collections does not let the last one win for every type (a repeated tuple
    override, e.g. `--config.model.pixels.stem_channels`, is appended to the first one's
    value), so a command that repeats a key does not say what it runs."""
    seen: dict[str, int] = {}
    for arg in argv:
        if arg.startswith("--config.") or arg.startswith("--noconfig."):
            key = arg.split("=", 1)[0].removeprefix("--no").removeprefix("--")
            seen[key] = seen.get(key, 0) + 1
    return [key for key, count in seen.items() if count > 1]


def resolve_flags(argv: list[str]) -> list[str]:
    """The same arguments with `--config=SPEC` / `--config SPEC` resolved (see `resolve`)."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--config="):
            out.append("--config=" + resolve(arg[len("--config="):]))
        elif arg == "--config" and i + 1 < len(argv):
            out += [arg, resolve(argv[i + 1])]
            i += 1
        else:
            out.append(arg)
        i += 1
    return out
