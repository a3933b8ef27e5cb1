"""Local multi-process launcher: N processes on this machine form one JAX job (CPU devices,
gloo collectives), each running `python -m ldot_jax.tools.train_cli` (`ldot train`) with its process id.

    ldot launch --processes 2 --devices_per_process 2 -- \
        --config=ldot_jax/configs/demo.py:pretrain,tiny --workdir=runs/two_process

This is how multi-host code paths are exercised without a cluster (the tests use it); on a
cluster use launch/slurm.sbatch or launch/tpu_pod.sh instead. Output lines are prefixed with
the process id; if one process fails, the others are stopped.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import threading

from ldot_jax.core import parallel


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def process_env(process_id: int, processes: int, devices_per_process: int, port: int,
                base: dict | None = None) -> dict:
    """The environment of local process `process_id`: the coordinator, the process count and
    id, CPU devices_per_process; the caller's other XLA flags are kept."""
    env = dict(os.environ if base is None else base)
    flags = [f for f in env.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    env.update({parallel.ENV_COORDINATOR: f"localhost:{port}",
                parallel.ENV_NUM_PROCESSES: str(processes),
                parallel.ENV_PROCESS_ID: str(process_id),
                "JAX_PLATFORMS": "cpu",
                "XLA_FLAGS": " ".join(
                    flags + [f"--xla_force_host_platform_device_count={devices_per_process}"])})
    return env


def _pump(stream, prefix: str, sink) -> None:
    for line in iter(stream.readline, ""):
        sink.write(f"{prefix}{line}")
        sink.flush()


def run_local(processes: int, args: list[str], devices_per_process: int = 1,
              module: str = "ldot_jax.tools.train_cli", timeout: float | None = None,
              sink=sys.stdout, cwd: str | None = None) -> list[int]:
    """Runs `python -m module *args` in `processes` processes; returns their exit codes."""
    if processes < 1 or devices_per_process < 1:
        raise ValueError(f"processes={processes}, devices_per_process={devices_per_process}: "
                         f"expected ≥ 1")
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-m", module, *args], cwd=cwd,
                              env=process_env(i, processes, devices_per_process, port),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(processes)]
    pumps = [threading.Thread(target=_pump, args=(p.stdout, f"[{i}] ", sink), daemon=True)
             for i, p in enumerate(procs)]
    for t in pumps:
        t.start()
    codes: list[int | None] = [None] * processes
    try:
        for i, p in enumerate(procs):
            codes[i] = p.wait(timeout=timeout)
            if codes[i] != 0:
                break  # the others would wait on the coordinator forever
    finally:
        for i, p in enumerate(procs):
            if p.poll() is None:
                p.kill()
            codes[i] = p.wait()
        for t in pumps:
            t.join(timeout=5)
    return [int(c) for c in codes]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ldot launch",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--devices_per_process", type=int, default=1)
    parser.add_argument("--module", default="ldot_jax.tools.train_cli")
    parser.add_argument("args", nargs=argparse.REMAINDER,
                        help="arguments of the module (after --)")
    ns = parser.parse_args(argv)
    args = ns.args[1:] if ns.args[:1] == ["--"] else ns.args
    codes = run_local(ns.processes, args, ns.devices_per_process, ns.module)
    return max(codes, key=abs)


if __name__ == "__main__":
    sys.exit(main())
