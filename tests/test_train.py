"""Training end to end on 8 simulated devices: every config loads; every task's loss and
gradient on the mesh equal the single-device computation; the tiny demo config trains and
its loss drops; a resumed run continues exactly; a checkpoint saved on 8 devices restores on
2; two processes (jax.distributed on localhost) equal one process; SIGTERM saves and stops;
a non-finite loss stops the run and leaves the last good checkpoint."""

import glob
import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from ldot_jax.checkpoints import checkpoint, pretrained
from ldot_jax.checkpoints import kinds
from ldot_jax.configs import demo, finetune_coco, finetune_flickr30k, pretrain  # noqa: E402
from ldot_jax.core import parallel
from ldot_jax.core import workdir as workdir_lib
from ldot_jax.data import datasets, mined_negatives
from ldot_jax.evaluation import evaluators
from ldot_jax.tools import export_cli, launch, mine_cli
from ldot_jax.training import export as export_lib
from ldot_jax.training import losses, metric_writer as metrics, optim, tasks, train

CONFIGS = {"demo": (demo, ["pretrain", "finetune", "rerank", "distill", "vldeformer",
                         "pretrain,tiny", "finetune,tiny", "rerank,tiny", "distill,tiny"]),
           "pretrain": (pretrain, ["coco_sbu", "vg_cc", "coco_sbu,tiny"]),
           "finetune_flickr30k": (finetune_flickr30k, ["", "tiny"]),
           "finetune_coco": (finetune_coco, ["", "tiny"])}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("data"))


def tiny_config(data_dir, stage="pretrain", steps=12, **train_overrides):
    c = demo.get_config(f"{stage},tiny")
    c.data.data_dir = data_dir
    c.train.num_steps = steps
    c.train.log_every = 1
    c.train.tensorboard = False
    c.train.checkpoint_every = 1000
    c.train.update(train_overrides)
    if stage == "pretrain":  # equal ratios: 12 steps draw every task (seed 0)
        c.tasks = {"cmr": 1, "vmlm": 1, "mrfr": 1, "mrckl": 1}
    return c


def train_rows(workdir):
    return {r["step"]: r for r in metrics.read_jsonl(workdir, "train")}


def final_params(workdir, step):
    path = os.path.join(workdir, workdir_lib.CHECKPOINTS, str(step), checkpoint.STATE)
    return checkpoint.restore_tree(path, checkpoint.tree_metadata(path))["params"]


def assert_rows_close(got, want, steps, atol):
    for step in steps:
        for key, value in want[step].items():
            if key in ("steps_per_sec", "examples_per_sec", "split", "step"):
                continue
            assert key in got[step], (step, key)
            np.testing.assert_allclose(got[step][key], value, atol=atol, rtol=0,
                                       err_msg=f"step {step} {key}")


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_every_config_loads(name):
    module, args = CONFIGS[name]
    for arg in args:
        c = module.get_config(arg)
        kind, model_cfg, _ = train.model_and_config(c)
        assert kind in ("lightningdot", "lightningdot_pretrain", "uniter_itm")
        train.pipeline_config(c)
        tasks.task_configs(c, tuple(tasks.TASKS))  # every task's sections parse
        for entry in evaluators.evals_config(c).values():
            evaluators.get(entry["type"])
        names, _ = tasks.check_mix(dict(c.tasks))
        kinds.check_tasks(kind, names)
        params = {"model": pretrained.abstract_params(kind, model_cfg)}
        optim.make_optimizer(c.optimizer, c.train.num_steps or 100_000, params)
        assert module.__doc__ and "ldot train --config=ldot_jax/configs/" in module.__doc__
    with pytest.raises(ValueError, match="expected|option"):
        module.get_config("nonsense")


def test_schedule_decay_mask_and_frozen_tower():
    schedule = optim.warmup_linear_decay(1.0, 10, 110)
    assert [float(schedule(s)) for s in (0, 5, 10, 60, 110)] == pytest.approx(
        [0, 0.5, 1.0, 0.5, 0.0])
    params = {"model": {"dual_encoder": {"text_tower": {"w": {"kernel": jnp.ones(3),
                                                              "bias": jnp.ones(3)}},
                                         "image_tower": {"w": {"kernel": jnp.ones(3)}}}},
              "contrastive": {"log_scale": jnp.zeros(())}}
    mask = optim.decay_mask(params)
    assert mask["model"]["dual_encoder"]["text_tower"]["w"] == {"kernel": True, "bias": False}
    assert mask["contrastive"]["log_scale"] is False
    config = {"learning_rate": 0.1, "warmup_steps": 0, "weight_decay": 0.1,
              "frozen": ("model/dual_encoder/text_tower",)}
    tx, _ = optim.make_optimizer(config, 10, params)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    text = new["model"]["dual_encoder"]["text_tower"]["w"]
    np.testing.assert_array_equal(text["kernel"], 1.0)
    assert float(new["model"]["dual_encoder"]["image_tower"]["w"]["kernel"][0]) < 1.0
    with pytest.raises(ValueError, match="match no parameter"):
        optim.make_optimizer({**config, "frozen": ("model/nothing",)}, 10, params)


def test_accumulation_averages_micro_batches():
    params = {"w": jnp.zeros(2)}
    config = {"learning_rate": 0.1, "warmup_steps": 0, "accumulation_steps": 2}
    tx, _ = optim.make_optimizer(config, 10, params)
    single, _ = optim.make_optimizer({**config, "accumulation_steps": 1}, 10, params)
    g1, g2 = {"w": jnp.array([1.0, -2.0])}, {"w": jnp.array([3.0, 0.5])}
    state = tx.init(params)
    u1, state = tx.update(g1, state, params)
    np.testing.assert_array_equal(u1["w"], 0.0)  # no update on the first micro-step
    u2, _ = tx.update(g2, state, params)
    want, _ = single.update(jax.tree.map(lambda a, b: (a + b) / 2, g1, g2),
                            single.init(params), params)
    np.testing.assert_allclose(u2["w"], want["w"], rtol=1e-6)


def _random_batch(rng, b=16, length=10, regions=6, feat=32, classes=37):
    labels = np.where(rng.random((b, length)) < 0.3, rng.integers(5, 60, (b, length)), -1)
    labels[:, 0] = -1
    # The same draws, in the same order, as before the inputs were pytrees.
    text = {"input_ids": rng.integers(5, 60, (b, length)).astype(np.int32),
            "attention_mask": (np.arange(length)[None] < rng.integers(4, length + 1, (b, 1))
                               ).astype(np.int32)}
    image = {"region_feat": rng.normal(size=(b, regions, feat)).astype(np.float32),
             "boxes": rng.random((b, regions, 7)).astype(np.float32),
             "region_mask": np.ones((b, regions), np.int32)}
    return dict(
        text=text, image=image,
        image_index=rng.integers(0, 8, b).astype(np.int32),
        valid=np.arange(b) < b - 2,
        vmlm_text={**text, "input_ids": rng.integers(5, 60, (b, length)).astype(np.int32)},
        vmlm_labels=labels.astype(np.int32),
        region_masked=rng.random((b, regions)) < 0.3,
        soft_labels=np.asarray(jax.nn.softmax(rng.normal(size=(b, regions, classes)))))


# itm and distill need frozen models: tests/test_slow_stage.py checks them the same way.
@pytest.mark.parametrize("task", sorted(set(tasks.TASKS) - {"itm", "distill"}))
def test_task_on_8_devices_equals_one_device(task):
    """Loss and metrics of every task on the 8-device mesh equal the single-device
    computation; for cmr (the sharded contrastive island) the gradient too, and it reaches
    the learned temperature. (The heads' losses are plain global means; compiling their
    gradients twice would only re-test XLA.) For cmr dropout is on: each device draws its
    rows of the global mask, so the masks too equal the single-device ones."""
    c = tiny_config("/unused")
    if task == "cmr":
        for tower in (c.model.text, c.model.image):
            tower.hidden_dropout = tower.attention_dropout = 0.1
    c.loss.same_image_positives = True
    c.loss.matryoshka_dims = (4, 8)
    c.loss.temperature = 0.5
    c.loss.learn_temperature = True
    c.loss.words_weight = 0.5
    kind, model_cfg, model = train.model_and_config(c)
    params = {"model": pretrained.init_params(kind, model_cfg, jax.random.key(0)),
              **tasks.init_params(c, (task,), model_cfg)}
    if task == "cmr":  # a words head away from its zero start, so the image gets gradients
        params["words"]["kernel"] = jax.random.normal(jax.random.key(4),
                                                      params["words"]["kernel"].shape)
    batch = _random_batch(np.random.default_rng(1))
    key = jax.random.key(3)

    def run(mesh):
        setup = tasks.make_setup(model, mesh, c, (task,))
        loss_fn = lambda p, b: tasks.get(task).loss(p, b, key, setup)
        fn = jax.jit(jax.value_and_grad(loss_fn, has_aux=True) if task == "cmr" else loss_fn)
        if mesh is None:
            return fn(params, batch)
        with jax.set_mesh(mesh):
            return fn(parallel.replicate(params, mesh), parallel.global_batch(batch, mesh))

    one, eight = run(None), run(parallel.make_mesh())
    if task == "cmr":
        (loss1, aux1), grads1 = one
        (loss8, aux8), grads8 = eight
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4),
                     grads8, grads1)
        assert float(jnp.abs(grads1["contrastive"]["log_scale"])) > 0
        assert float(jnp.abs(grads1["words"]["kernel"]).max()) > 0
        assert {"cmr_loss_4d", "temperature", "words_loss"} <= set(aux1)
    else:
        (loss1, aux1), (loss8, aux8) = one, eight
    assert np.isfinite(float(loss1)) and float(loss1) > 0
    np.testing.assert_allclose(loss8, loss1, atol=1e-5, rtol=1e-5)
    for k in aux1:
        np.testing.assert_allclose(aux8[k], aux1[k], atol=1e-5, rtol=1e-5, err_msg=k)


def test_words_loss_equals_numpy():
    """losses.words_loss against a NumPy bag of words: each caption id once (a repeated id and
    padding not), the binary cross-entropy summed over the vocabulary, invalid pairs out."""
    rng = np.random.default_rng(7)
    b, length, dim, vocab = 5, 6, 4, 9
    ids = rng.integers(0, vocab, (b, length)).astype(np.int32)
    ids[0, :3] = [2, 2, 5]  # a repeated id counts once
    mask = (np.arange(length)[None] < np.array([[6], [3], [6], [1], [4]])).astype(np.int32)
    valid = np.array([True, True, False, True, True])
    head = {"kernel": rng.normal(size=(dim, vocab)).astype(np.float32),
            "bias": rng.normal(size=vocab).astype(np.float32)}
    image = rng.normal(size=(b, dim)).astype(np.float32)
    got = losses.words_loss(head, image, {"input_ids": ids, "attention_mask": mask}, valid)
    unit = image / np.linalg.norm(image, axis=1, keepdims=True) * np.sqrt(dim)
    logits = unit @ head["kernel"] + head["bias"]
    per_pair = []
    for row in np.flatnonzero(valid):
        target = np.zeros(vocab)
        target[ids[row, mask[row] > 0]] = 1
        p = 1 / (1 + np.exp(-logits[row]))
        per_pair.append(-(target * np.log(p) + (1 - target) * np.log(1 - p)).sum())
    np.testing.assert_allclose(float(got), np.mean(per_pair), rtol=1e-5)
    with pytest.raises(ValueError, match="words_weight=-1"):
        tasks.LossConfig(words_weight=-1.0)
    with pytest.raises(ValueError, match="sized by the model's config"):
        tasks.LossConfig(words_weight=1.0).init_params()


def test_vmlm_positions_gather_every_masked_token():
    labels = np.full((3, 8), -1, np.int32)
    labels[0, [2, 5]] = [11, 12]
    labels[1, [1, 2, 3, 6]] = [1, 2, 3, 4]
    positions, gathered = tasks.vmlm_positions(jnp.asarray(labels))
    assert positions.shape == (3, 4)
    np.testing.assert_array_equal(gathered[0], [11, 12, -1, -1])
    np.testing.assert_array_equal(positions[1], [1, 2, 3, 6])
    np.testing.assert_array_equal(gathered[2], [-1] * 4)


@pytest.fixture(scope="module")
def uninterrupted(data_dir, tmp_path_factory):
    """12 pre-training steps (all four tasks), evaluated and checkpointed at the end."""
    workdir = str(tmp_path_factory.mktemp("uninterrupted"))
    summary = train.train_and_evaluate(tiny_config(data_dir, tensorboard=True), workdir)
    return workdir, summary


def test_pretraining_exports_resumes_exactly_and_restores_on_2_devices(uninterrupted, data_dir,
                                                                         tmp_path):
    """One test over the one uninterrupted run (so that under pytest-xdist it is made once)."""
    check_pretraining_runs_every_task_and_exports(uninterrupted)
    check_resume_continues_exactly(uninterrupted, data_dir, tmp_path)
    check_checkpoint_from_8_devices_restores_on_2(uninterrupted)


def check_pretraining_runs_every_task_and_exports(uninterrupted):
    workdir, summary = uninterrupted
    assert summary["step"] == 12 and not summary["preempted"]
    rows = train_rows(workdir)
    seen = {k for r in rows.values() for k in r if k.endswith("_loss")}
    assert {"cmr_loss", "vmlm_loss", "mrfr_loss", "mrckl_loss"} <= seen
    recall = {"ir_r1", "ir_r5", "ir_r10", "tr_r1", "tr_r5", "tr_r10", "ar"}
    # + caption-true recall: the scenes can tell which captions are true of which images, and
    # what each caption asks for (every image has captions of each kind).
    by_kind = {f"ct_ir_r1_{k}" for k in ("partial", "count", "count_all", "relation")}
    assert set(summary["eval"]) == recall | {"ct_" + m for m in recall} | by_kind
    assert glob.glob(os.path.join(workdir, metrics.TENSORBOARD, "events.out.tfevents.*"))
    saved = json.load(open(os.path.join(workdir, workdir_lib.CONFIG_FILE)))
    assert saved["tasks"] == {"cmr": 1, "vmlm": 1, "mrfr": 1, "mrckl": 1}
    model_dir = os.path.join(workdir, workdir_lib.MODEL_DIR)
    loaded = pretrained.load_pretrained(model_dir)
    assert loaded.kind == "lightningdot_pretrain"
    assert loaded.metadata["step"] == 12 and loaded.metadata["exported_by"] == "train"
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(loaded.params),
                 jax.device_get(final_params(workdir, 12)["model"]))
    # The run's tokenizer travels with the model: a model directory alone is enough to query.
    data_dir = workdir_lib.load_config(workdir).data.data_dir
    [dataset_vocab] = glob.glob(os.path.join(data_dir, "ldot_scenes", "*", "*", "vocab.txt"))
    for directory in (os.path.join(model_dir, pretrained.TOKENIZER_DIR),
                      workdir_lib.tokenizer_dir(workdir)):
        with open(os.path.join(directory, "vocab.txt")) as f, open(dataset_vocab) as want:
            assert f.read() == want.read()
    assert pretrained.load_tokenizer(model_dir).encode("a red circle") == (
        export_lib.run_tokenizer(workdir).encode("a red circle"))
    # `ldot export` from the checkpoint writes the same model; a step not kept is named.
    out = os.path.join(os.path.dirname(workdir), "exported-12")
    assert export_cli.main(["--workdir", workdir, "--step", "12", "--out", out]) == 0
    again = pretrained.load_pretrained(out)
    assert again.metadata["exported_by"] == "export" and again.metadata["step"] == 12
    jax.tree.map(np.testing.assert_array_equal, again.params, loaded.params)
    with pytest.raises(checkpoint.CheckpointError, match=r"no step 5 .*kept: \[12\]"):
        export_lib.export(workdir, step=5, out=out)


def check_resume_continues_exactly(uninterrupted, data_dir, tmp_path):
    workdir, _ = uninterrupted
    first = train.train_and_evaluate(tiny_config(data_dir, stop_at=6), str(tmp_path))
    assert first["step"] == 6 and not first["eval"]
    assert os.listdir(tmp_path / workdir_lib.CHECKPOINTS) == ["6"]
    second = train.train_and_evaluate(tiny_config(data_dir), str(tmp_path))
    assert second["step"] == 12
    want, got = train_rows(workdir), train_rows(str(tmp_path))
    assert_rows_close(got, want, range(7, 13), atol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=0),
                 final_params(str(tmp_path), 12), final_params(workdir, 12))


def check_checkpoint_from_8_devices_restores_on_2(uninterrupted):
    workdir, _ = uninterrupted
    c = tiny_config("/unused")
    kind, model_cfg, _ = train.model_and_config(c)
    states = {}
    for devices in (8, 2):
        mesh = parallel.make_mesh(devices)
        tx, _ = optim.make_optimizer(c.optimizer, 12, {"model": pretrained.abstract_params(
            kind, model_cfg)})
        state = train.init_state(c, kind, model_cfg, tx, mesh, load_pretrained=False)
        with checkpoint.TrainCheckpointer(os.path.join(workdir, workdir_lib.CHECKPOINTS)) as ckpt:
            states[devices], data_state = ckpt.restore(train._abstract(state))
        leaf = jax.tree.leaves(states[devices].params)[0]
        assert len(leaf.sharding.device_set) == devices
        assert data_state  # the pipeline position came back too
    assert int(states[2].step) == 12
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 states[2], states[8])


def test_tiny_finetuning_loss_drops(data_dir, tmp_path):
    c = tiny_config(data_dir, "finetune", steps=150, log_every=25)
    summary = train.train_and_evaluate(c, str(tmp_path))
    losses = [r["cmr_loss"] for _, r in sorted(train_rows(str(tmp_path)).items())]
    chance = np.log(c.pipeline.batch_size)  # uniform scores over the in-batch images
    assert losses[-1] < min(losses[0], chance) - 0.3, losses
    assert summary["eval"]["ar"] > 0


def test_the_export_takes_the_best_checkpoint(data_dir, tmp_path):
    """Evaluated and checkpointed every 2 steps, best by val AR (which falls after step 2 in
    this tiny run, so the best is not the last step): training's export, `ldot export --best`
    and `--step` each write the checkpoint they name."""
    c = tiny_config(data_dir, "finetune", steps=6, eval_every=2, checkpoint_every=2,
                    keep_checkpoints=1, best_metric="ar", best_mode="max")
    workdir = str(tmp_path / "run")
    train.train_and_evaluate(c, workdir)
    scores = {r["step"]: r["ar"] for r in metrics.read_jsonl(workdir) if "ar" in r}
    assert sorted(scores) == [2, 4, 6]
    best = max(scores, key=scores.get)
    assert best != 6, scores  # (else this test would not tell the best from the last)
    kept = sorted(int(n) for n in os.listdir(os.path.join(workdir, workdir_lib.CHECKPOINTS))
                  if n.isdigit())
    assert kept == sorted({best, 6})  # the latest and the best
    model = pretrained.load_pretrained(os.path.join(workdir, workdir_lib.MODEL_DIR))
    assert model.metadata["step"] == best
    # How the run's vectors are compared, for galleries built from the model alone.
    assert model.metadata["normalize"] == bool(c.loss.normalize)
    np.testing.assert_allclose(model.metadata["best_metric"]["ar"], scores[best], rtol=1e-6)
    jax.tree.map(np.testing.assert_array_equal, model.params, final_params(workdir, best)["model"])
    out = str(tmp_path / "best")
    assert export_cli.main(["--workdir", workdir, "--best", "--out", out]) == 0
    jax.tree.map(np.testing.assert_array_equal, pretrained.load_pretrained(out).params,
                 model.params)
    last = export_lib.export(workdir, out=str(tmp_path / "last"))
    assert last[1] == 6 and pretrained.load_pretrained(last[0]).metadata["step"] == 6
    with pytest.raises(ValueError, match="no train.best_metric"):
        c2 = tiny_config(data_dir, "finetune", steps=6)
        c2.train.best_metric = ""
        export_lib.choose_step(export_lib.run_checkpointer(workdir, c2), best=True)


def test_two_processes_equal_one_process(data_dir, tmp_path):
    """2 processes × 4 CPU devices (jax.distributed, gloo) against 1 process × 8 devices on the
    same global batches: the same losses and the same updated parameters.

    Adam with eps 1e-8 turns rounding noise in near-zero gradient entries (sums reduced in
    another order) into full-size updates; eps = 1 makes updates proportional to gradients
    (SGD), so equal parameters mean equal gradients."""
    c = tiny_config(data_dir, "finetune", steps=6)
    c.data.eval_split = ""
    c.optimizer.eps, c.optimizer.learning_rate = 1.0, 1.0
    c.loss.matryoshka_dims = ()  # one loss term: rounding stays within the 1e-6 below
    one = str(tmp_path / "one")
    train.train_and_evaluate(c, one)
    two = str(tmp_path / "two")
    args = ["--config=ldot_jax/configs/demo.py:finetune,tiny", f"--workdir={two}",
            f"--config.data.data_dir={data_dir}", "--config.train.num_steps=6",
            "--config.loss.matryoshka_dims=()",
            "--config.train.log_every=1", "--config.train.tensorboard=False",
            "--config.data.eval_split=", "--config.optimizer.eps=1.0",
            "--config.optimizer.learning_rate=1.0"]
    codes = launch.run_local(2, args, devices_per_process=4, timeout=600, cwd=ROOT)
    assert codes == [0, 0]
    assert_rows_close(train_rows(two), train_rows(one), range(1, 7), atol=1e-6)
    kind, model_cfg, _ = train.model_and_config(c)
    initial = pretrained.init_params(kind, model_cfg, jax.random.key(c.seed))
    trained_one, trained_two = final_params(one, 6)["model"], final_params(two, 6)["model"]
    moved = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(
        jax.tree.leaves(trained_one), jax.tree.leaves(initial)))
    assert moved > 1e-3
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=0),
                 trained_two, trained_one)
    # A multi-process run exports too (process 0 writes the replicated parameters), and a
    # single process exports its checkpoints.
    exported = pretrained.load_pretrained(os.path.join(two, workdir_lib.MODEL_DIR))
    jax.tree.map(np.testing.assert_array_equal, exported.params, trained_two)
    path, step = export_lib.export(two, step=6, out=str(tmp_path / "two-6"))
    jax.tree.map(np.testing.assert_array_equal, pretrained.load_pretrained(path).params,
                 trained_two)


def test_two_processes_export_the_best_checkpoint(data_dir, tmp_path):
    """A 2-process run evaluated every 2 steps exports its best checkpoint (process 0 reads
    its parameters alone), with the same scores as the one-process run of the same config."""
    two = str(tmp_path / "two")
    args = ["--config=ldot_jax/configs/demo.py:finetune,tiny", f"--workdir={two}",
            f"--config.data.data_dir={data_dir}", "--config.train.num_steps=6",
            "--config.train.log_every=1", "--config.train.tensorboard=False",
            "--config.train.eval_every=2", "--config.train.checkpoint_every=2",
            "--config.train.keep_checkpoints=1"]
    assert launch.run_local(2, args, devices_per_process=4, timeout=600, cwd=ROOT) == [0, 0]
    scores = {r["step"]: r["ar"] for r in metrics.read_jsonl(two) if "ar" in r}
    best = max(scores, key=scores.get)
    assert sorted(scores) == [2, 4, 6] and best != 6, scores
    model = pretrained.load_pretrained(os.path.join(two, workdir_lib.MODEL_DIR))
    assert model.metadata["step"] == best
    jax.tree.map(np.testing.assert_array_equal, model.params,
                 export_lib.checkpoint_params(two, best))


def test_sigterm_saves_and_stops(data_dir, tmp_path):
    workdir = str(tmp_path)
    cmd = [sys.executable, "-m", "ldot_jax.main", "--config=ldot_jax/configs/demo.py:finetune,tiny",
           f"--workdir={workdir}", f"--config.data.data_dir={data_dir}",
           "--config.train.num_steps=150", "--config.train.log_every=1",
           "--config.train.tensorboard=False"]
    # The same devices and schedule as test_tiny_finetuning_loss_drops: cached programs.
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    jsonl = os.path.join(workdir, metrics.JSONL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(jsonl) and len(open(jsonl).readlines()) >= 3:
            break
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    summary = json.loads(out[out.rindex("\n{"):])
    assert summary["preempted"] and 3 <= summary["step"] < 150
    assert glob.glob(os.path.join(workdir, workdir_lib.CHECKPOINTS, str(summary["step"])))


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(data_dir, tmp_path,
                                                                 monkeypatch):
    """Batch 6 carries NaN features: the run stops naming step 6; the checkpoint of step 4
    stays the latest and nothing after the NaN is saved."""
    c = tiny_config(data_dir, "finetune", steps=150, checkpoint_every=4)
    c.data.eval_split = ""
    real_load = train.load_data

    class Poisoned:
        def __init__(self, inner):
            self.inner, self.count = inner, 0

        def __next__(self):
            batch = next(self.inner)
            self.count += 1
            if self.count == 7:
                image = batch["image"]
                batch = {**batch, "image": {**image, "region_feat": image["region_feat"] * np.nan}}
            return batch

        def get_state(self):
            return self.inner.get_state()

        def set_state(self, state):
            self.inner.set_state(state)

    def load_poisoned(config):
        data = real_load(config)
        data.iterator = Poisoned(data.iterator)
        return data

    monkeypatch.setattr(train, "load_data", load_poisoned)
    with pytest.raises(train.NonFiniteLossError, match="step 6 .*Last good checkpoint: step 4"):
        train.train_and_evaluate(c, str(tmp_path))
    assert sorted(os.listdir(tmp_path / workdir_lib.CHECKPOINTS)) == ["4"]


def test_checkpointer_keeps_the_latest_and_the_best(tmp_path):
    tree = {"w": jnp.arange(3.0)}
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                           sharding=x.sharding), tree)
    with checkpoint.TrainCheckpointer(tmp_path, keep=2, best_metric="ar") as ckpt:
        for step in range(1, 6):
            metrics = {2: {"ar": 50.0}, 3: {"ar": 10.0}}.get(step)
            ckpt.save(step, jax.tree.map(lambda x: x + step, tree), {"next_index": step},
                      metrics)
        ckpt.wait()
        assert ckpt.all_steps() == [2, 4, 5] and ckpt.best_step() == 2
        state, data_state = ckpt.restore(abstract, step=2)
        np.testing.assert_array_equal(state["w"], [2.0, 3.0, 4.0])
        assert data_state == {"next_index": 2}
        with pytest.raises(checkpoint.CheckpointError, match="no step 3"):
            ckpt.restore(abstract, step=3)
    # After a restart the best step is still known (its metrics are on disk) and kept.
    with checkpoint.TrainCheckpointer(tmp_path, keep=2, best_metric="ar") as ckpt:
        for step in (6, 7):
            ckpt.save(step, tree, {"next_index": step})
        ckpt.wait()
        assert ckpt.all_steps() == [2, 6, 7] and ckpt.best_step() == 2
    with pytest.raises(ValueError, match="best_mode"):
        checkpoint.TrainCheckpointer(tmp_path, best_mode="largest")


def test_bfloat16_training_step(data_dir):
    """bf16 compute (f32 parameters and optimizer state): the step's loss is within bf16
    rounding of the f32 step's, and the parameters stay f32."""
    losses = {}
    for dtype in ("float32", "bfloat16"):
        c = tiny_config(data_dir, "finetune")
        c.model.text.dtype = c.model.image.dtype = dtype
        kind, model_cfg, model = train.model_and_config(c)
        mesh = parallel.make_mesh()
        tx, _ = optim.make_optimizer(c.optimizer, 10, {"model": pretrained.abstract_params(
            kind, model_cfg)})
        state = train.init_state(c, kind, model_cfg, tx, mesh, load_pretrained=False)
        step = train.make_train_step("cmr", tasks.make_setup(model, mesh, c, ("cmr",)), tx)
        batch = _random_batch(np.random.default_rng(0))
        batch["text_index"] = np.arange(16, dtype=np.int32)
        with jax.set_mesh(mesh):
            state, out = step(state, parallel.global_batch(batch, mesh), jax.random.key(0), {})
        assert {x.dtype for x in jax.tree.leaves(state.params)} == {jnp.dtype("float32")}
        assert bool(out["finite"])
        losses[dtype] = float(out["loss"])
    assert losses["bfloat16"] == pytest.approx(losses["float32"], abs=0.05)


def test_mined_negatives_from_a_run_feed_the_reranker(data_dir, tmp_path):
    """python -m ldot_jax.mine on a (tiny) fine-tuning run, then re-ranker training on batches
    of anchors and their mined images: the file is valid and the step trains."""
    dual = str(tmp_path / "finetune")
    train.train_and_evaluate(tiny_config(data_dir, "finetune", steps=3), dual)
    out = str(tmp_path / "mined.npz")
    assert mine_cli.main(["--workdir", dual, "--out", out, "--k", "5"]) == 0
    config = tiny_config(data_dir, "rerank", steps=3)
    dataset = datasets.load_for_run(config.data)
    num_images = len(dataset.split("train"))
    negatives, meta = mined_negatives.read(out, num_images)
    assert negatives.shape == (num_images, 5) and meta["split"] == "train"
    assert (negatives >= 0).all() and not (negatives == np.arange(num_images)[:, None]).any()
    config.itm.dual = os.path.join(dual, workdir_lib.MODEL_DIR)
    config.pipeline.mined_negatives = out
    config.pipeline.mined_per_anchor = 1
    summary = train.train_and_evaluate(config, str(tmp_path / "rerank"))
    assert summary["step"] == 3 and np.isfinite(summary["train"]["itm_loss"])
