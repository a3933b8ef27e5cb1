"""Defaults shared by the experiment configs (each experiment file overrides what it changes).

Sections (what reads them):
  model_kind, model   the network (ldot_jax/configs/models.py presets; ldot_jax.models.config)
  data                dataset name or prepared directory, builder config, splits (data/datasets.py)
  pipeline            global batch, buckets, caption length (data/pipeline.py)
  tasks               {task: mix ratio} over cmr / vmlm / mrfr / mrckl / itm / distill
                      (training/tasks/: one module per task, registered by name)
  loss                the CMR loss options (contrastive.py, tasks.LossConfig)
  optimizer           the recipe (optim.py)
  init                model directories to start from, per tower (initialize.py)
  mesh                device mesh: data × model (parallel.py)
  itm                 the cross-encoder's objective and its hard-negative sampler
                      (tasks/itm.py)
  distill             distillation from the cross-encoder into the towers (tasks/distill.py)
  train               steps, logging, evaluation, checkpoints (train.py)
  evals               optional: the evaluators, {name: dict(type=..., split=..., every=...,
                      type's keys)}, e.g. c.evals = {"val": dict(type="dot_recall",
                      split="val", every=1000)} (metrics "val/ir_r1", …; best_metric "val/ar");
                      types: ldot_jax/evaluation/evaluators. Not set here: without it
                      data.eval_split, train.eval_every and itm.eval_top describe the one
                      evaluation (dot_recall for the towers, rerank_recall of itm.dual's top
                      for the cross-encoder), its metrics unprefixed ("ar")
  index               the fast stage: extraction and the index built after training
                      (ldot_jax/index/build.py, `ldot index build`)
Fields that default to None are typed placeholders, so `--config.x=value` works on them.
As a config file, `ldot_jax/configs/base.py:<model preset>` gives these defaults (fine-tuning CMR on
the scenes data with that preset).
"""

import ml_collections
from ml_collections.config_dict import placeholder

from ldot_jax.configs import models


def base_config(preset: str, model_kind: str | None = None) -> ml_collections.ConfigDict:
    """Every section's defaults (see the module docstring) around model preset `preset`."""
    preset_config = models.get_config(preset)
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.model_kind = model_kind or preset_config.kind
    c.model = preset_config.model
    c.data = _data()
    c.pipeline = _pipeline()
    c.tasks = ml_collections.ConfigDict({"cmr": 1})
    c.loss = _loss()
    c.optimizer = _optimizer()
    c.init = _init()
    c.mesh = ml_collections.ConfigDict({"data": -1, "model": 1})
    c.train = _train()
    c.itm = _itm()  # the cross-encoder's training (task itm, model kind uniter_itm)
    c.distill = _distill()  # distillation from the cross-encoder into the towers
    c.index = _index()
    return c


def _data() -> ml_collections.ConfigDict:
    s = ml_collections.ConfigDict()
    s.name = "scenes"  # a registered dataset, or the directory of a prepared one
    s.config = placeholder(str)
    s.data_dir = placeholder(str)
    s.manual_dir = placeholder(str)
    s.vocab = placeholder(str)
    s.overrides = ml_collections.ConfigDict()  # builder config fields, e.g. train_size
    s.train_split = "train"
    s.eval_split = "val"
    return s


def _pipeline() -> ml_collections.ConfigDict:
    s = ml_collections.ConfigDict()
    s.batch_size = 128  # global: split over processes and devices
    s.text_buckets = (16, 24, 32, 48, 64)
    s.region_buckets = (16, 36, 64, 100)
    s.max_text_len = 60
    s.length_policy = "drop"
    s.num_threads = 4
    s.prefetch = 4
    # Hard negatives mined from an index over the whole training split (python -m
    # ldot_jax.mine): each anchor caption brings captions of mined_per_anchor of its mined
    # images into the batch, where the in-batch samplers (itm, distill) and CMR find them.
    s.mined_negatives = placeholder(str)
    s.mined_per_anchor = 1
    return s


def _loss() -> ml_collections.ConfigDict:
    s = ml_collections.ConfigDict()
    s.kind = "softmax"
    s.negatives = "global"
    s.same_image_positives = False
    s.normalize = False
    s.chunk_size = placeholder(int)
    s.temperature = placeholder(float)
    s.learn_temperature = False
    s.matryoshka_dims = ()
    s.matryoshka_weights = ()
    # > 0: the image vector also predicts its caption's words (losses.words_loss), this weighted.
    s.words_weight = 0.0
    return s


def _optimizer() -> ml_collections.ConfigDict:
    s = ml_collections.ConfigDict()
    s.learning_rate = 2e-5
    s.warmup_steps = placeholder(int)
    s.warmup_fraction = 0.1
    s.b1 = 0.9
    s.b2 = 0.999
    s.eps = 1e-8
    s.weight_decay = 0.0
    s.clip_norm = 2.0
    s.accumulation_steps = 1
    s.frozen = ()
    return s


def _init() -> ml_collections.ConfigDict:
    s = ml_collections.ConfigDict()
    s.model = placeholder(str)
    s.text = placeholder(str)
    s.image = placeholder(str)
    return s


def _train() -> ml_collections.ConfigDict:
    s = ml_collections.ConfigDict()
    s.num_steps = placeholder(int)
    s.num_epochs = placeholder(float)
    s.stop_at = placeholder(int)  # end this run early (with a checkpoint)
    s.log_every = 50
    s.eval_every = placeholder(int)
    s.eval_batch_size = 256
    s.checkpoint_every = 1000
    s.keep_checkpoints = 3
    s.best_metric = "ar"  # an evaluator's metric (with `evals`: "<name>/ar")
    s.best_mode = "max"
    s.async_checkpoints = True
    # "ocdbt" (Orbax's default: a few large files per step) or "zarr" (one TensorStore array
    # per leaf, no database manifest): for object stores without conditional writes, such as
    # some S3-compatible stores and the GCS emulator the tests run against.
    s.checkpoint_format = "ocdbt"
    s.tensorboard = True
    s.progress_bar = True
    s.export = True
    # Restarting in a workdir with a config that differs outside workdir.MUTABLE_KEYS is an
    # error unless this is set (the change is then recorded in config_changes.jsonl).
    s.allow_config_change = False
    return s


def _itm() -> ml_collections.ConfigDict:
    """tasks.ItmConfig."""
    s = ml_collections.ConfigDict()
    s.dual = placeholder(str)  # the dual encoder's model dir that draws hard negatives
    s.itm_weight = 1.0
    s.rank_weight = 1.0
    s.list_weight = 0.0  # listwise softmax over the positive and its negatives (LCE)
    s.negatives = 1  # hard negatives per positive and direction
    s.residual_scale = placeholder(float)  # listwise loss on scale · dual + cross score
    s.margin = 0.2
    s.sample_temperature = 1.0
    s.normalize = False  # sample on cosines (towers trained with loss.normalize)
    s.eval_top = 20  # evaluation: recall after re-ranking the dual encoder's top 20
    return s


def _distill() -> ml_collections.ConfigDict:
    """tasks.DistillConfig."""
    s = ml_collections.ConfigDict()
    s.teacher = placeholder(str)  # the cross-encoder's model dir
    s.weight = 1.0
    s.temperature = 1.0
    s.candidates = 8
    s.sample_temperature = 1.0
    s.head = "rank"
    s.residual = False  # teacher = the student's own score + the cross-encoder's (fused)
    return s


def _index() -> ml_collections.ConfigDict:
    s = ml_collections.ConfigDict()
    s.split = "test"
    s.backend = "scann"  # scann | hierarchical | exact
    s.sides = ("image", "text")  # image: for text→image search; text: image→text
    s.shard_size = 4096  # rows per extraction shard (the unit of resuming)
    s.d_low = placeholder(int)  # hierarchical: the coarse prefix (a matryoshka dim)
    s.candidates = 100  # hierarchical: coarse results re-scored at full dimension
    s.health_queries = 1000  # queries of the other modality for recall vs exact
    # Recall-targeted builds (index/tuning.py): the cheapest settings whose recall@target_k
    # against exact search reaches target_recall on held-out queries of the other modality.
    s.target_recall = placeholder(float)
    s.target_k = 10
    # ScaNN overrides of the size rule (index/scann_index.scann_params), e.g. num_leaves.
    s.scann = ml_collections.ConfigDict({
        "num_leaves": placeholder(int), "leaves_to_search": placeholder(int),
        "training_sample_size": placeholder(int), "hashing": placeholder(bool),
        "reorder": placeholder(int), "num_threads": placeholder(int)})
    s.exact = ml_collections.ConfigDict({"chunk_size": 16384, "dtype": "float32"})
    return s


def parse_arg(arg: str | None, choices: tuple[str, ...], default: str,
              where: str) -> tuple[str, set[str]]:
    """"choice[,tiny]" → (choice, {"tiny"}); `choices` () takes options only ("tiny")."""
    parts = [p for p in (arg or "").split(",") if p]
    choice = parts.pop(0) if choices and parts and parts[0] in choices else default
    if (choices and choice not in choices) or set(parts) - {"tiny"}:
        valid = f"one of {choices}, optionally followed by ',tiny'" if choices else "'tiny'"
        raise ValueError(f"{where}:{arg}: expected {valid}")
    return choice, set(parts)


def finetune_karpathy(name: str, epochs: float, arg: str | None) -> ml_collections.ConfigDict:
    """The original's fine-tuning recipe on a Karpathy split (configs/finetune_*.py)."""
    _, options = parse_arg(arg, (), "", f"configs/finetune_{name}.py")
    c = base_config("lightningdot_base", "lightningdot")
    c.data.name = "karpathy"
    c.data.config = name
    c.data.eval_split = "val"
    c.tasks = {"cmr": 1}
    c.pipeline.batch_size = 64
    c.train.num_epochs = epochs
    c.train.eval_every = 2_000
    c.train.checkpoint_every = 2_000
    if "tiny" in options:
        tiny(c)
    return c


def get_config(arg: str = "scenes") -> ml_collections.ConfigDict:
    return base_config(arg or "scenes")


def pretraining_recipe(c: ml_collections.ConfigDict) -> None:
    """The original's pre-training optimizer (AdamW β2 0.98, eps 1e-6, wd 0.01, clip 5.0,
    10k warm-up, lr 5e-5)."""
    c.optimizer.learning_rate = 5e-5
    c.optimizer.warmup_steps = 10_000
    c.optimizer.warmup_fraction = placeholder(float)
    c.optimizer.b2 = 0.98
    c.optimizer.eps = 1e-6
    c.optimizer.weight_decay = 0.01
    c.optimizer.clip_norm = 5.0


def tiny(c: ml_collections.ConfigDict, steps: int = 20) -> None:
    """Shrinks a config to a seconds-long CPU run on a small scenes dataset (tests, smoke)."""
    cross = c.model_kind == "uniter_itm"
    c.model = models.get_config("tiny_uniter" if cross else "tiny").model
    # A wider init: at BERT's 0.02 the 16-wide tiny towers give every input the same vector
    # to 0.2%, and the contrastive loss starts on a plateau (ln B) that takes most of a short
    # run to leave; at 0.2 the scores differ from the first step.
    for side in ("transformer",) if cross else ("text", "image"):
        c.model[side].initializer_range = 0.2
        c.model[side].vocab_size = 256
    c.model.region.feat_dim = 32
    c.model.region.num_classes = 37
    c.data.name = "scenes"
    c.data.config = "small"
    c.data.overrides = ml_collections.ConfigDict(
        {"train_size": 48, "val_size": 16, "test_size": 16, "feat_dim": 32})
    c.data.vocab = placeholder(str)
    c.pipeline.batch_size = 16
    c.pipeline.text_buckets = (32,)
    c.pipeline.region_buckets = (16,)
    c.pipeline.max_text_len = 30
    c.pipeline.num_threads = 1
    c.pipeline.prefetch = 1
    c.optimizer.learning_rate = 3e-3
    c.optimizer.warmup_steps = 2
    c.optimizer.warmup_fraction = placeholder(float)
    c.train.num_steps = steps
    c.train.num_epochs = placeholder(float)
    c.train.log_every = 5
    c.train.eval_every = placeholder(int)
    c.train.eval_batch_size = 16
    c.train.checkpoint_every = 10
    c.train.progress_bar = False
