"""Preparing splits over 1 GB without TensorFlow.

TFDS's writer (tensorflow_datasets.core.shuffle.Shuffler, also with disable_shuffling) keeps a
split's serialized records in memory up to MAX_MEM_BUFFER_SIZE (1 GB), then spills them to
bucket files through `tf.io.gfile`, which needs TensorFlow, which ldot_jax does not install
(TFDS reads and writes array_record without it). So a split over 1 GB — pictures: the scenes
rendered at 128 × 128 are 1.5 GB, COCO's 123k pictures at 224 × 224 18.5 GB — failed with
ModuleNotFoundError after its whole generation. `spill_without_tensorflow()` hands the
shuffler, while it is active and only where TensorFlow is not installed, the file operations
it uses (GFile, exists, remove; ResourceExhaustedError) on the local files the preparation
writes (datasets.prepare's directories are local) instead.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import types

from tensorflow_datasets.core import shuffle


class _NeverRaised(Exception):
    """tf.errors.ResourceExhaustedError's stand-in: Python raises OSError for a full disk or
    too many open files, which then propagates as it is."""


def _gfile(path, mode: str = "r"):
    return open(os.fspath(path), mode)


SHIM = types.SimpleNamespace(
    io=types.SimpleNamespace(gfile=types.SimpleNamespace(
        GFile=_gfile, exists=lambda path: os.path.exists(os.fspath(path)),
        remove=lambda path: os.remove(os.fspath(path)))),
    errors=types.SimpleNamespace(ResourceExhaustedError=_NeverRaised))


def tensorflow_installed() -> bool:
    return importlib.util.find_spec("tensorflow") is not None


@contextlib.contextmanager
def spill_without_tensorflow():
    """While active (a dataset's preparation), TFDS's shuffler spills to local files without
    TensorFlow when it is not installed; with TensorFlow, nothing changes. A TFDS whose
    shuffler has no `tf` to replace is left as it is (tests/test_datasets.py would fail on
    a spill there, naming this module's test)."""
    if tensorflow_installed() or not hasattr(shuffle, "tf"):
        yield
        return
    saved = shuffle.tf
    shuffle.tf = SHIM
    try:
        yield
    finally:
        shuffle.tf = saved
