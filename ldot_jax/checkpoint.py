"""The only module that touches Orbax.

Array pytrees are saved with Orbax's StandardCheckpointer (OCDBT/Zarr under the hood) and
restored onto explicit shardings, so a tree saved on one mesh restores onto another.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import jax
import orbax.checkpoint as ocp


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete or does not match the model."""


def save_tree(path: str | os.PathLike, tree: Any) -> None:
    """Writes an array pytree to `path` (which must not exist) and waits for completion."""
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(os.path.abspath(path), tree)
        checkpointer.wait_until_finished()


def tree_metadata(path: str | os.PathLike) -> Any:
    """Pytree of jax.ShapeDtypeStruct describing what is stored at `path`.

    Raises CheckpointError if `path` is missing or not a complete Orbax checkpoint.
    """
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"no parameter checkpoint at {path}")
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            metadata = checkpointer.metadata(path)
    except Exception as e:  # Orbax raises several types for partial or foreign directories.
        raise CheckpointError(
            f"{path} is not a complete Orbax checkpoint (interrupted write?): {e}") from e
    # Newer Orbax wraps the tree in StepMetadata.item_metadata.tree.
    tree = getattr(getattr(metadata, "item_metadata", metadata), "tree", metadata)
    if not isinstance(tree, Mapping):
        raise CheckpointError(f"{path} is not a complete Orbax checkpoint (interrupted write?): "
                              f"its array metadata is missing")
    return jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), tree,
                        is_leaf=lambda m: hasattr(m, "shape") and hasattr(m, "dtype"))


def restore_tree(path: str | os.PathLike, abstract_tree: Any, sharding=None) -> Any:
    """Restores the tree at `path` into the structure, shapes and dtypes of `abstract_tree`.

    `sharding`: a jax.sharding.Sharding for every leaf, or a pytree of them; default: the
    first local device.
    """
    if sharding is None:
        sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    if isinstance(sharding, jax.sharding.Sharding):
        shardings = jax.tree.map(lambda _: sharding, abstract_tree)
    else:
        shardings = sharding
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract_tree, shardings)
    with ocp.StandardCheckpointer() as checkpointer:
        return checkpointer.restore(os.path.abspath(path), target)
