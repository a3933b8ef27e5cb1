"""A training run under a real SIGKILL while a checkpoint save is in flight: the restart resumes
from the last complete checkpoint (never a half-written one, including the temporary directory
an interrupted Orbax save leaves), recomputes the lost steps exactly, logs every step once and
removes what the crash left."""

import glob
import json
import os

import numpy as np

from ldot_jax.checkpoints import checkpoint
from ldot_jax.configs import demo
from ldot_jax.core import workdir as workdir_lib
from ldot_jax.training import metric_writer, train

import faults

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS, EVERY = 8, 2
TRAIN = "import sys\nfrom ldot_jax.tools import train_cli\nsys.exit(train_cli.main(sys.argv[1:]))"


def flags(workdir, data_dir):
    return [f"--config={ROOT}/ldot_jax/configs/demo.py:finetune,tiny", f"--workdir={workdir}",
            f"--config.data.data_dir={data_dir}", f"--config.train.num_steps={STEPS}",
            f"--config.train.checkpoint_every={EVERY}", "--config.train.log_every=1",
            "--config.train.tensorboard=False", "--config.data.eval_split="]


def config(data_dir):
    c = demo.get_config("finetune,tiny")
    c.data.data_dir = str(data_dir)
    c.train.num_steps, c.train.checkpoint_every, c.train.log_every = STEPS, EVERY, 1
    c.train.tensorboard, c.data.eval_split = False, ""
    return c


def rows(workdir):
    return [r for r in metric_writer.read_jsonl(str(workdir), "train")]


def test_a_run_killed_while_saving_a_checkpoint_resumes_exactly_and_logs_each_step_once(
        tmp_path):
    data, run = tmp_path / "data", tmp_path / "run"
    # Killed right after the save of step 6 started (the third save): it may or may not be
    # complete by then; either is a valid state to resume from.
    faults.kill_at("checkpoint_started#3", flags(run, data), tmp_path, TRAIN)
    logged = {r["step"]: r for r in rows(run)}
    assert set(logged) >= set(range(1, 7))
    ckpts = run / workdir_lib.CHECKPOINTS
    with checkpoint.TrainCheckpointer(ckpts) as reader:
        resumed_from = reader.latest_step()
    assert resumed_from in (4, 6)
    # What an interrupted save leaves (Orbax writes a temporary directory, renamed when whole).
    torn = ckpts / "8.orbax-checkpoint-tmp"  # the name this Orbax gives an unfinished save
    (torn / checkpoint.STATE).mkdir(parents=True)
    (torn / checkpoint.STATE / "garbage").write_bytes(b"\0" * 100)

    summary = train.train_and_evaluate(config(data), str(run))
    assert summary["step"] == STEPS
    steps = [r["step"] for r in rows(run)]
    assert steps == list(range(1, STEPS + 1))  # each step once
    again = {r["step"]: r for r in rows(run)}
    for step in range(resumed_from + 1, 7):  # recomputed after the restart: the same numbers
        for key, value in logged[step].items():
            if isinstance(value, float) and not key.endswith("_per_sec"):
                np.testing.assert_allclose(again[step][key], value, atol=1e-6, rtol=0,
                                           err_msg=f"step {step} {key}")
    assert not glob.glob(str(ckpts / "*tmp*"))  # the torn save was removed
    with checkpoint.TrainCheckpointer(ckpts) as reader:
        assert reader.latest_step() == STEPS
    assert not [n for n in os.listdir(run) if n.startswith(".")]  # no temporary left
    assert not (tmp_path / ".run.lock").exists()  # the run directory's lock, beside it
    assert json.load(open(run / workdir_lib.CONFIG_FILE))["train"]["num_steps"] == STEPS
