"""Devices, meshes and multi-host input: everything about where arrays live.

A training job is one `jax.jit` program over a `Mesh` with axes ("data", "model"):
  data   splits the global batch (pure data parallelism; the contrastive loss all-gathers over it);
  model  is 1 today and leaves room for tensor parallelism without changing any call site.
Both axes are Explicit (`jax.sharding.AxisType.Explicit`), so shardings are part of the types
jit sees. Params and optimizer state are replicated (`P()`); batches are sharded `B@data`.

Multi-host: `initialize_distributed` starts `jax.distributed` when the environment asks for it
(explicit coordinator, SLURM, Open MPI, a TPU pod) and does nothing on a single machine. Each
process then reads its own rows of every global batch (the pipeline's process shard) and
`global_batch` assembles them into global arrays with `jax.make_array_from_process_local_data`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Mapping

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

log = logging.getLogger(__name__)

DATA, MODEL = "data", "model"
# Explicit settings, read when the corresponding argument is not given.
ENV_COORDINATOR = "LDOT_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "LDOT_NUM_PROCESSES"
ENV_PROCESS_ID = "LDOT_PROCESS_ID"


@dataclasses.dataclass(frozen=True)
class DistributedSettings:
    """How this process joins a multi-process job. `mode` is "explicit" (coordinator, count
    and id known), "auto" (JAX detects them: TPU pod, SLURM, Open MPI) or "single"."""

    mode: str
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    reason: str = ""


def _env_int(env: Mapping[str, str], key: str) -> int | None:
    value = env.get(key)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {key}={value!r}: expected an integer") from None


def detect_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                       process_id: int | None = None,
                       env: Mapping[str, str] | None = None) -> DistributedSettings:
    """Decides how to start: arguments first, then LDOT_* variables, then cluster detection.

    A SLURM or MPI job with a single task and a single-host TPU stay "single": starting the
    distributed runtime there would only add a coordinator to talk to.
    """
    env = os.environ if env is None else env
    coordinator_address = coordinator_address or env.get(ENV_COORDINATOR) or None
    num_processes = num_processes if num_processes is not None else _env_int(
        env, ENV_NUM_PROCESSES)
    process_id = process_id if process_id is not None else _env_int(env, ENV_PROCESS_ID)
    given = {"coordinator_address": coordinator_address, "num_processes": num_processes,
             "process_id": process_id}
    if any(v is not None for v in given.values()):
        missing = [k for k, v in given.items() if v is None]
        if missing:
            raise ValueError(f"multi-process settings are partial: {missing} missing (given "
                             f"{ {k: v for k, v in given.items() if v is not None} }); set all "
                             f"three or none ({ENV_COORDINATOR}, {ENV_NUM_PROCESSES}, "
                             f"{ENV_PROCESS_ID})")
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise ValueError(f"process_id={process_id} must be in [0, num_processes="
                             f"{num_processes})")
        if num_processes == 1:
            return DistributedSettings("single", reason="num_processes=1")
        return DistributedSettings("explicit", coordinator_address, num_processes, process_id,
                                   reason="explicit coordinator")
    if (_env_int(env, "SLURM_NTASKS") or 1) > 1 and "SLURM_JOB_ID" in env:
        return DistributedSettings("auto", reason=f"SLURM job {env['SLURM_JOB_ID']} with "
                                                  f"{env['SLURM_NTASKS']} tasks")
    if (_env_int(env, "OMPI_COMM_WORLD_SIZE") or 1) > 1:
        return DistributedSettings("auto", reason=f"Open MPI with "
                                                  f"{env['OMPI_COMM_WORLD_SIZE']} ranks")
    hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]
    if len(hosts) > 1 or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return DistributedSettings("auto", reason=f"TPU pod with {max(len(hosts), 1)} hosts")
    return DistributedSettings("single", reason="no multi-process environment")


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None, process_id: int | None = None,
                           ) -> DistributedSettings:
    """Starts `jax.distributed` if this is a multi-process job (see `detect_distributed`).

    Must run before the first JAX computation; calling it again is a no-op.
    """
    settings = detect_distributed(coordinator_address, num_processes, process_id)
    if settings.mode == "single" or jax.distributed.is_initialized():
        return settings
    log.info("starting jax.distributed (%s)", settings.reason)
    if settings.mode == "explicit":
        jax.distributed.initialize(settings.coordinator_address, settings.num_processes,
                                   settings.process_id)
    else:
        jax.distributed.initialize()
    log.info("process %d of %d, %d local / %d global devices", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())
    return settings


def make_mesh(data: int = -1, model: int = 1, devices=None) -> Mesh:
    """A (data, model) mesh with Explicit axes. `data=-1`: all devices / model.

    A single-process job may ask for fewer devices than it has (the first data × model are
    used, e.g. to resume a run saved on 8 devices on 2); a multi-process job uses them all.
    """
    devices = list(jax.devices() if devices is None else devices)
    if model < 1 or len(devices) % model:
        raise ValueError(f"mesh model={model} does not divide the {len(devices)} devices")
    if data == -1:
        data = len(devices) // model
    if data < 1 or data * model > len(devices):
        raise ValueError(f"mesh data={data} × model={model} needs {data * model} devices, "
                         f"there are {len(devices)}")
    if data * model < len(devices):
        if jax.process_count() > 1:
            raise ValueError(f"mesh data={data} × model={model} < {len(devices)} devices: a "
                             f"multi-process job must use every device (data=-1)")
        log.info("mesh uses %d of %d devices", data * model, len(devices))
        devices = devices[:data * model]
    return jax.make_mesh((data, model), (DATA, MODEL),
                         axis_types=(AxisType.Explicit, AxisType.Explicit), devices=devices)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Rows split over `data`: [B@data, ...]."""
    return NamedSharding(mesh, P(DATA))


def data_size(mesh: Mesh) -> int:
    return mesh.shape[DATA]


def check_global_batch(global_batch_size: int, mesh: Mesh) -> None:
    """The global batch must split evenly over the data axis and over the processes."""
    shards = data_size(mesh)
    if global_batch_size % shards:
        raise ValueError(f"global batch_size={global_batch_size} is not divisible by the "
                         f"{shards} devices of the mesh's data axis")
    if global_batch_size % jax.process_count():
        raise ValueError(f"global batch_size={global_batch_size} is not divisible by the "
                         f"{jax.process_count()} processes")


def global_batch(local_batch: Mapping[str, Any], mesh: Mesh) -> dict[str, Any]:
    """This process's rows (a pytree of NumPy arrays [B / processes, ...], e.g. a batch with
    its text and image input pytrees) → the same pytree of global arrays [B@data, ...].

    Every process must pass arrays of the same shapes (the pipeline pads each global batch to
    one bucket for that reason); process p's rows become rows p·b … (p+1)·b − 1.
    """
    sharding = batch_sharding(mesh)
    return jax.tree.map(
        lambda v: jax.make_array_from_process_local_data(sharding, np.asarray(v)),
        dict(local_batch))


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Puts a host pytree (the same on every process) on every device of `mesh`."""
    sharding = replicated(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_callback(
        np.shape(x), sharding, lambda index: np.asarray(x)[index]), tree)


def to_host(tree: Any) -> Any:
    """Replicated global arrays → NumPy on every process (no communication)."""
    def one(x):
        if x.is_fully_addressable:
            return np.asarray(jax.device_get(x))
        if not x.sharding.is_fully_replicated:
            raise ValueError(f"to_host: array of shape {x.shape} is sharded across processes "
                             f"({x.sharding}); use gather_rows")
        return np.asarray(x.addressable_shards[0].data)
    return jax.tree.map(one, tree)


def gather_rows(x: jax.Array) -> np.ndarray:
    """A global array sharded over processes (e.g. [B@data, ...]) → the whole array as NumPy
    on every process."""
    if x.is_fully_addressable:
        return np.asarray(jax.device_get(x))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
