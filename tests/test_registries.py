"""The registries of training tasks, evaluators and image towers: typos raise with the valid
names, a duplicate registration is refused, the trainer names no task and no model kind, the
old evaluation keys give today's evaluation, a run with two evaluators writes both metric sets
(and `train.best_metric` must name one of them), and a new image tower is its module, its
TowerSpec and its ImageInput."""

import ast
import pathlib
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldot_jax.checkpoints import kinds, pretrained
from ldot_jax.configs import demo
from ldot_jax.core import parallel
from ldot_jax.core import workdir as workdir_lib
from ldot_jax.data import batching, datasets, pipeline
from ldot_jax.evaluation import evaluators, recall
from ldot_jax.index.exact import ExactIndex
from ldot_jax.models import towers
from ldot_jax.retrieval import encode, extract
from ldot_jax.retrieval.retriever import Retriever
from ldot_jax.checkpoints import checkpoint
from ldot_jax.training import export, metric_writer, tasks, train
from ldot_jax.training.tasks import common
from test_train import tiny_config  # the tiny runs' settings

TRAIN_PY = pathlib.Path(train.__file__)
RECALL = set(evaluators.common.RECALL_METRICS)


# ---------------------------------------------------------------------------------------------
# Tasks


def test_a_task_typo_names_the_valid_tasks():
    valid = re.escape(str(sorted(tasks.TASKS)))
    with pytest.raises(ValueError, match=rf"unknown task 'cmrr'; valid tasks are {valid}"):
        tasks.get("cmrr")
    with pytest.raises(ValueError, match="unknown task 'mlm'"):
        tasks.check_mix({"cmr": 1, "mlm": 1})
    assert set(tasks.TASKS) == {"cmr", "vmlm", "mrfr", "mrckl", "itm", "distill"}


def test_a_duplicate_task_is_refused():
    before = dict(tasks.TASKS)
    with pytest.raises(ValueError, match="task 'cmr' is already registered"):
        tasks.register(tasks.get("cmr"))
    # Another task may not parse a section into another dataclass ...
    clash = common.Task("clash", tasks.get("cmr").loss, sections={"loss": tasks.ItmConfig})
    with pytest.raises(ValueError, match="section 'loss' into ItmConfig; task 'cmr' into "
                                         "LossConfig"):
        tasks.register(clash)
    # ... nor read a frozen model's name from another key.
    spec = common.FrozenModel("dual", "other.dual", accepts=lambda kind: True, expected="any")
    with pytest.raises(ValueError, match="frozen model 'dual' from other.dual; task 'itm' "
                                         "from itm.dual"):
        tasks.register(common.Task("clash", tasks.get("cmr").loss, frozen=(spec,)))
    assert tasks.TASKS == before


def test_the_trainer_derives_what_the_tasks_declare():
    """Pipeline masks, config sections and frozen models all come from the declarations."""
    assert tasks.pipeline_flags(("cmr",)) == {"mask_regions": False, "mask_text": False}
    assert tasks.pipeline_flags(("vmlm", "mrckl")) == {"mask_regions": True, "mask_text": True}
    c = demo.get_config("pretrain,tiny")
    assert train.pipeline_config(c).mask_text and train.pipeline_config(c).mask_regions
    c.tasks = {"cmr": 1}
    assert not train.pipeline_config(c).mask_text
    c.itm.negatives, c.distill.candidates = 3, 5
    configs = tasks.task_configs(c, ("itm", "distill"))
    assert set(configs) == {"itm", "distill", "loss"}
    assert configs["itm"].negatives == 3 and configs["distill"].candidates == 5
    assert [(t, s.name, s.key, s.required) for t, s in tasks.frozen_models(
        ("cmr", "itm", "distill"))] == [("itm", "dual", "itm.dual", False),
                                        ("distill", "teacher", "distill.teacher", True)]
    itm_dual = tasks.get("itm").frozen[0]
    assert [k for k in kinds.NAMES if itm_dual.accepts(k)] == list(kinds.dual_encoder_kinds())
    with pytest.raises(ValueError, match="task 'distill' needs distill.teacher: a model "
                                         "directory of kind 'uniter_itm'"):
        train.frozen_models(c, ("distill",), evaluators.LoadedModels(None))


def _string_literals(tree):
    """Every string constant of a module except docstrings."""
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docstrings.add(id(first.value))
    return [node.value for node in ast.walk(tree) if isinstance(node, ast.Constant)
            and isinstance(node.value, str) and id(node) not in docstrings]


def test_the_trainer_names_no_task_and_no_model_kind():
    literals = _string_literals(ast.parse(TRAIN_PY.read_text()))
    assert "train.best_metric" in literals  # the check sees the module's strings
    names = sorted(set(tasks.TASKS) | set(kinds.NAMES))
    found = [(name, text) for text in literals for name in names
             if re.search(rf"\b{re.escape(name)}\b", text)]
    assert not found, f"ldot_jax/training/train.py names tasks / model kinds: {found}"


# ---------------------------------------------------------------------------------------------
# Evaluators


def test_an_evaluator_typo_names_the_valid_types():
    valid = re.escape(str(sorted(evaluators.TYPES)))
    with pytest.raises(ValueError, match=rf"unknown evaluator type 'dot_recal'; valid types "
                                         rf"are {valid}"):
        evaluators.get("dot_recal")
    c = demo.get_config("finetune,tiny")
    c.evals = {"val": {"type": "dot_recal", "split": "val"}}
    with pytest.raises(ValueError, match="evals.val: unknown evaluator type 'dot_recal'"):
        evaluators.from_config(c, None)
    c.evals = {"val": {"type": "dot_recall", "spilt": "val"}}
    with pytest.raises(ValueError, match=r"evals.val: unknown keys \['spilt'\] for type "
                                         r"'dot_recall'; its keys are \['type', 'every', "
                                         r"'prefix', 'split'\]"):
        evaluators.from_config(c, None)
    c.evals = {"val": {"split": "val"}}
    with pytest.raises(ValueError, match="evals.val: no type"):
        evaluators.from_config(c, None)


def test_a_duplicate_evaluator_type_is_refused():
    before = dict(evaluators.TYPES)
    with pytest.raises(ValueError, match="evaluator type 'dot_recall' is already registered"):
        evaluators.register("dot_recall", object)
    assert evaluators.TYPES == before
    assert evaluators.get("rerank_recall").metrics == evaluators.get("dot_recall").metrics


def test_without_evals_the_old_keys_give_todays_evaluation():
    c = demo.get_config("finetune,tiny")
    assert evaluators.evals_config(c) == {"": {"type": "dot_recall", "split": "val",
                                               "every": None}}
    c.train.eval_every = 7
    assert evaluators.evals_config(c)[""]["every"] == 7
    c.data.eval_split = ""
    assert evaluators.evals_config(c) == {}
    rerank = demo.get_config("rerank,tiny")
    assert evaluators.evals_config(rerank) == {}  # the cross-encoder without itm.dual
    rerank.itm.dual, rerank.itm.eval_top = "/some/model", 10
    assert evaluators.evals_config(rerank) == {"": {"type": "rerank_recall", "split": "val",
                                                    "every": None, "top": 10}}
    rerank.evals = {"v": {"type": "rerank_recall", "top": 5}}  # an evals section wins
    assert evaluators.evals_config(rerank) == {"v": {"type": "rerank_recall", "top": 5}}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("data"))


def test_two_evaluators_write_both_metric_sets(data_dir, tmp_path):
    """dot_recall on val and on test in one tiny run: both sets, prefixed, in the summary and
    in metrics.jsonl; each is the recall of its own split by the final towers; best_metric
    names one of them and the best checkpoint is kept by it."""
    c = tiny_config(data_dir, "finetune", steps=4)
    c.evals = {"val": {"type": "dot_recall", "split": "val", "every": 2},
               "test": {"type": "dot_recall", "split": "test"}}
    c.train.best_metric = "val/ar"
    workdir = str(tmp_path)
    summary = train.train_and_evaluate(c, workdir)
    want = {f"{split}/{m}" for split in ("val", "test") for m in RECALL}
    # The scenes can tell which captions are true of which images: caption-true recall too
    # (built evaluators write it; the types declare what every dataset gets).
    # and its IR R@1 per kind of caption the split has.
    dataset = datasets.load_for_run(c.data)
    kinds = {split: dataset.caption_kinds(split) for split in ("val", "test")}
    by_kind = {split: {f"{split}/ct_ir_r1_{k}" for k in set(kinds[split])}
               for split in ("val", "test")}
    assert set(kinds["val"]) == {"partial", "count", "count_all", "relation"}
    true = {f"{split}/ct_{m}" for split in ("val", "test") for m in RECALL}
    true |= by_kind["val"] | by_kind["test"]
    assert set(summary["eval"]) == want | true and want == set(evaluators.declared_metrics(c))
    rows = {r["step"]: r for r in metric_writer.read_jsonl(workdir, "eval")}
    assert sorted(rows) == [2, 4]
    assert {k for k in rows[2] if "/" in k} == {f"val/{m}" for m in RECALL} | {
        f"val/ct_{m}" for m in RECALL} | by_kind["val"]
    assert {k for k in rows[4] if "/" in k} == want | true
    with checkpoint.TrainCheckpointer(f"{workdir}/{workdir_lib.CHECKPOINTS}",
                                      best_metric="val/ar") as ckpt:
        assert ckpt.all_steps() == [2, 4]
        assert rows[ckpt.best_step()]["val/ar"] == max(rows[s]["val/ar"] for s in (2, 4))
        best = ckpt.best_step()
    # The export is the best checkpoint by val/ar; each set of the final evaluation is its own
    # split's recall by the final towers (step 4's checkpoint).
    loaded = pretrained.load_pretrained(f"{workdir}/{workdir_lib.MODEL_DIR}")
    assert loaded.metadata["step"] == best
    mesh = parallel.make_mesh()
    model = pretrained.build_model(loaded.kind, loaded.config)
    params = parallel.replicate(export.checkpoint_params(workdir, 4), mesh)
    for split in ("val", "test"):
        captions = extract.eval_captions(dataset.caption_table(split), dataset.tokenizer,
                                         split, c)
        image_vectors, text_vectors, caption_image = extract.embed_split(
            model, params, dataset.split(split), captions, c, mesh)
        expected = recall.retrieval_metrics(
            text_vectors, image_vectors, caption_image, truth=dataset.caption_truth(split),
            kinds=kinds[split], kind_names=sorted(set(kinds[split])))
        assert set(expected) == {k.split("/")[1] for k in want | true if k.startswith(split)}
        for metric, value in expected.items():
            np.testing.assert_allclose(summary["eval"][f"{split}/{metric}"], value, atol=1e-9,
                                       err_msg=f"{split}/{metric}")


def test_best_metric_must_name_an_evaluators_metric(data_dir, tmp_path):
    c = tiny_config(data_dir, "finetune", steps=2)
    c.evals = {"val": {"type": "dot_recall", "split": "val"}}
    c.train.best_metric = "ar"  # the default evaluator's name; this run's is val/ar
    with pytest.raises(ValueError, match=r"train.best_metric='ar' is not an evaluator's "
                                         r"metric; valid metrics are \['val/ir_r1'"):
        train.train_and_evaluate(c, str(tmp_path / "prefixed"))
    c = tiny_config(data_dir, "finetune", steps=2)
    c.train.best_metric = "val/ar"
    with pytest.raises(ValueError, match=r"train.best_metric='val/ar' .* valid metrics are "
                                         r"\['ir_r1'"):
        train.train_and_evaluate(c, str(tmp_path / "default"))
    assert not (tmp_path / "default" / workdir_lib.CHECKPOINTS).exists()  # before any step


# ---------------------------------------------------------------------------------------------
# Image towers


class _MeanPixels(nn.Module):
    """A toy image tower over {"pixels": f32[B, H, W, 3]}: mean colour → one state → P."""

    hidden: int
    project_dim: int

    @nn.compact
    def __call__(self, image, masked_regions=None, deterministic=True):
        pixels = image["pixels"]
        if pixels.ndim != 4 or pixels.shape[-1] != 3:
            raise ValueError(f"pixels {pixels.shape}: expected [B, H, W, 3]")
        state = nn.Dense(self.hidden)(pixels.mean((1, 2)))
        sequence = state[:, None]
        return towers.TowerOutput(sequence, jnp.ones(sequence.shape[:2], jnp.int32), state,
                                  nn.Dense(self.project_dim)(state))


def _collate_pixels(images, buckets, batch_size=None, stub_rows=False):
    size = batch_size or len(images)
    first = np.asarray(images[0]["pixels"])
    out = np.zeros((size, *first.shape), np.float32)
    for row, image in enumerate(images):
        out[row] = image["pixels"]
    return {"pixels": out}


def test_a_new_image_tower_needs_its_module_its_spec_and_its_input(monkeypatch, tmp_path):
    """The README's "Adding a tower" in three pieces (a module, its TowerSpec, its ImageInput),
    registered here only: the model builds and saves (shape inference through the spec), the
    evaluation batches and extraction carry the new input, and the Retriever's image queries
    encode it, each equal to the tower applied to the stacked pixels directly."""
    monkeypatch.setitem(towers.IMAGE_TOWERS, "mean_pixels", towers.TowerSpec(
        build=lambda c: _MeanPixels(c.text.hidden_size, c.project_dim),
        dummy_input=lambda c: {"pixels": jnp.zeros((1, 4, 4, 3), jnp.float32)},
        collate="float_pixels"))
    monkeypatch.setitem(batching.IMAGE_INPUTS, "float_pixels", batching.ImageInput(
        from_record=lambda record: {"pixels": np.asarray(record["pixels"], np.float32)},
        record_size=lambda record: 1, collate=_collate_pixels,
        split=lambda batch: [{"pixels": p} for p in np.asarray(batch["pixels"])]))
    config = demo.get_config("finetune,tiny")
    config.model.image_tower = "mean_pixels"
    config.pipeline.region_buckets = (1,)
    kind, model_config, model = train.model_and_config(config)
    params = pretrained.init_params(kind, model_config, jax.random.key(0))
    loaded = pretrained.load_pretrained(
        pretrained.save_pretrained(tmp_path / "model", kind, model_config, params))
    assert loaded.config.image_tower == "mean_pixels"

    rng = np.random.default_rng(0)
    records = [{"pixels": rng.random((4, 4, 3)), "image_id": f"image{i}",
                "caption_ids": np.array([5 + i, 6], np.int32),
                "caption_lengths": np.array([1, 1], np.int32)} for i in range(11)]

    class Ids:  # pre-tokenized captions need only [CLS] / [SEP]
        cls_id, sep_id = 1, 2
    captions = pipeline.tokenize_captions(records, Ids(), None, "drop")
    images, texts, owners = extract.embed_split(model, params, records, captions, config,
                                                parallel.make_mesh())
    direct = encode.encode_batch(model, params,
                                 {"pixels": np.stack([r["pixels"] for r in records])}, "image")
    np.testing.assert_allclose(images, np.asarray(direct), rtol=1e-5, atol=1e-6)
    assert texts.shape == (22, images.shape[1]) and owners.tolist() == [i // 2 for i in range(22)]

    text_index = ExactIndex(texts.shape[1]).add(texts, np.arange(len(texts)))
    retriever = Retriever(model, params, tokenizer=None, text_index=text_index)
    retriever.warmup()
    queries = [{"pixels": r["pixels"]} for r in records[:3]]
    np.testing.assert_allclose(retriever.encode_image(queries), images[:3], rtol=1e-5,
                               atol=1e-6)
    hits = retriever.search_image(queries, k=4)
    expected = np.argsort(-(images[:3] @ texts.T), axis=1, kind="stable")[:, :4]
    np.testing.assert_array_equal(hits.ids, expected)


def test_an_image_input_typo_names_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown image input 'pixel'.*\['regions', 'pixels'\]"):
        pipeline.PipelineConfig(image_input="pixel")
    with pytest.raises(ValueError, match=r"unknown image tower 'vitt'.*'uniter_regions', 'vit'"):
        towers.image_tower("vitt")
