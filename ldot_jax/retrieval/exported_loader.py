"""Runs the programs `ldot export-serving` wrote, in a process that imports only jax and numpy
(no Flax, no ldot_jax): this file is copied into the export directory as loader.py.

    import loader                                  # or: python loader.py DIR (a smoke run)
    programs = loader.load("exported/clip")
    vectors = programs["text"][16](input_ids=ids, attention_mask=mask)     # f32[B, P]
    vectors = programs["image"][0](pixels=pixels)                          # uint8[B, S, S, 3]
    scores = programs["rerank"][16](input_ids=…, attention_mask=…, region_feat=…, …)

programs[side][bucket]: side "text" (bucket: the padded text length), "image" (regions: the
padded region count; pixels: 0) or "rerank" (the text bucket; its region count is fixed). The
batch size is free (a symbolic dimension); every other dimension is the bucket's.
manifest.json says what each program takes (names, shapes with "b" for the batch, dtypes).
"""

from __future__ import annotations

import json
import os
import sys

import jax
import numpy as np

MANIFEST = "manifest.json"
FORMAT = "ldot_jax.exported"


class Program:
    """One exported program: its inputs by name, the parameters it is called with."""

    def __init__(self, exported, params: list, inputs: list[dict], name: str):
        self.exported, self.params, self.inputs, self.name = exported, params, inputs, name

    def __call__(self, **arrays) -> np.ndarray:
        names = [spec["name"] for spec in self.inputs]
        missing = sorted(set(names) - set(arrays))
        extra = sorted(set(arrays) - set(names))
        if missing or extra:
            raise ValueError(f"{self.name}: expected inputs {names}; missing {missing}, "
                             f"unexpected {extra}")
        values, batch = [], None
        for spec in self.inputs:
            value = _conform(np.asarray(arrays[spec["name"]]), np.dtype(spec["dtype"]),
                             f"{self.name}: {spec['name']}")
            shape = spec["shape"]
            if value.ndim != len(shape) or any(
                    want != "b" and got != want for got, want in zip(value.shape, shape)):
                raise ValueError(f"{self.name}: {spec['name']} has shape {list(value.shape)},"
                                 f" expected {shape} (b: the batch)")
            if batch is not None and value.shape[0] != batch:
                raise ValueError(f"{self.name}: {spec['name']} has batch {value.shape[0]}, "
                                 f"the other inputs {batch}")
            batch = value.shape[0]
            values.append(value)
        return np.asarray(self.exported.call(self.params, *values))


def _conform(value: np.ndarray, dtype: np.dtype, what: str) -> np.ndarray:
    """value as `dtype`, refusing what a cast would change: floats to ints, values outside
    the integer range (uint8 pixels), non-finite floats."""
    if value.dtype == dtype:
        out = value
    elif np.issubdtype(dtype, np.integer):
        if not np.issubdtype(value.dtype, np.integer) and value.dtype != bool:
            raise ValueError(f"{what}: dtype {value.dtype}, expected {dtype} (integers)")
        info = np.iinfo(dtype)
        if value.size and (value.min() < info.min or value.max() > info.max):
            raise ValueError(f"{what}: values in [{value.min()}, {value.max()}] do not fit "
                             f"{dtype}")
        out = value.astype(dtype)
    else:
        if not (np.issubdtype(value.dtype, np.number) or value.dtype == bool):
            raise ValueError(f"{what}: dtype {value.dtype}, expected {dtype}")
        out = value.astype(dtype)
    if np.issubdtype(dtype, np.floating) and not np.isfinite(out).all():
        raise ValueError(f"{what}: non-finite values")
    return out


def load(directory: str) -> dict[str, dict[int, Program]]:
    """Every program of an export directory, by side and bucket."""
    with open(os.path.join(directory, MANIFEST)) as f:
        manifest = json.load(f)
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{directory}: not an ldot_jax export ({manifest.get('format')!r})")
    params = {}
    out: dict[str, dict[int, Program]] = {}
    for entry in manifest["programs"]:
        source = entry["params"]
        if source not in params:
            with np.load(os.path.join(directory, source)) as z:
                params[source] = [z[f"{i:05d}"] for i in range(len(z.files))]
        with open(os.path.join(directory, entry["file"]), "rb") as f:
            exported = jax.export.deserialize(bytearray(f.read()))
        out.setdefault(entry["side"], {})[int(entry["bucket"])] = Program(
            exported, params[source], entry["inputs"], entry["file"])
    return out


if __name__ == "__main__":  # a smoke run: every program on ones of batch 2
    for side, programs in load(sys.argv[1]).items():
        for bucket, program in programs.items():
            ones = {s["name"]: np.ones([2 if d == "b" else d for d in s["shape"]],
                                         s["dtype"]) for s in program.inputs}
            print(side, bucket, program(**ones).shape)
