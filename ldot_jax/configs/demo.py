"""The scenes demo: LightningDOT pre-training and fine-tuning on the built-in scenes data.

    ldot train --config=ldot_jax/configs/demo.py:pretrain --workdir=runs/demo/pretrain
    ldot train --config=ldot_jax/configs/demo.py:finetune --workdir=runs/demo/finetune \\
        --config.init.model=runs/demo/pretrain/model

    ldot train --config=ldot_jax/configs/demo.py:rerank --workdir=runs/demo/rerank \\
        --config.itm.dual=runs/demo/finetune/model

Stages (the first part of the argument):
  pretrain  VMLM, MRFR, MRC-kl and CMR mixed 8 : 4 : 4 : 16 (the original's COCO/SBU ratios),
            the pre-training recipe, from scratch (the 2-layer `scenes_small` preset);
  finetune  CMR only with the fine-tuning recipe (lr 2e-5 → 1e-4 here: a small model from a
            short pre-training), global negatives; Matryoshka loss on the 32-d prefix too;
  rerank    the UNITER ITM re-ranker (`scenes_small_uniter`, its trunk from the pre-trained
            towers), 800 steps: ITM cross-entropy, rank hinge and a listwise softmax over 3 hard
            negatives per positive and direction drawn from the fine-tuned towers (itm.dual);
            the listwise loss scores pairs as 20 · cosine + cross logit, so the re-ranker
            learns a correction to the dot stage and re-ranks fused (α chosen on val);
  distill   fine-tuning with the re-ranker as teacher (distill.teacher), from init.model;
  vldeformer  the same, both towers initialized from the re-ranker (init.text, init.image).
Add `,tiny` (e.g. `ldot_jax/configs/demo.py:pretrain,tiny`) for a seconds-long run on a 48-image
scenes set with the `tiny` model: what the tests run.

What the demo reaches (2-core CPU, test split, 1,000 caption queries over 1,000 images): the
dot stage IR R@1 7.7 / AR 43.9; re-ranking its top 10 fused with the dot score IR R@1 11.8 /
AR 47.5 (top 20: 12.0 / 50.0). The re-ranker is what gains most from a longer run: at 400
steps re-ranking alone is below the dot stage (val IR R@1 at M = 10: 7.2 vs 8.3; fused 8.7),
at 800 (the demo) above it (12.5; fused 13.3), at 1,600 (10 minutes) 13.7; fused 15.0.
Distillation from the demo's re-ranker into the towers (distill, 300 steps) does not beat 300
more CMR steps (val AR 44.2 vs 45.3). Measurements and settings: BENCHMARKS.md.

The scenes data (30k training images) is generated on first use (about a minute on 2 cores).
"""

from ml_collections.config_dict import placeholder

from ldot_jax.configs import base

# The demo's evaluation (ldot_jax.two_stage.evaluate_workdir): a seeded sample of the test
# queries against the whole test corpus (1,000 images, 5,000 captions), to keep the
# cross-encoder's share of `make demo` to a minute; α for the fused score chosen on 1,000 val
# caption queries.
EVAL = {"max_queries": 1000, "max_image_queries": 250, "alpha_split": "val",
        "alpha_queries": 1000}
EVAL_TINY = {"ms": (10, 20), "alpha_split": "val", "pairs_per_batch": 64}

def _pretrain(c) -> None:
    base.pretraining_recipe(c)
    c.tasks = {"cmr": 16, "vmlm": 8, "mrfr": 4, "mrckl": 4}
    c.optimizer.learning_rate = 5e-4
    c.optimizer.warmup_steps = 30
    c.train.num_steps = 300


def _finetune(c) -> None:
    c.model_kind = "lightningdot"
    c.tasks = {"cmr": 1}
    c.optimizer.learning_rate = 3e-4
    c.optimizer.warmup_steps = 30
    c.optimizer.warmup_fraction = placeholder(float)
    c.train.num_steps = 500


def _rerank(c) -> None:
    """UNITER ITM, its trunk initialized from the pre-trained towers (--config.init.model);
    hard negatives from the fine-tuned towers (--config.itm.dual), on their cosines."""
    c.tasks = {"itm": 1}
    c.pipeline.batch_size = 32  # × (1 + 2 · 3 negatives) = 224 cross-encoder pairs a step
    c.loss.matryoshka_dims = ()
    c.itm.normalize = True
    c.itm.sample_temperature = 0.1
    c.itm.negatives = 3
    c.itm.list_weight = 1.0
    c.itm.residual_scale = 1.0 / c.loss.temperature
    c.itm.eval_top = 20
    c.optimizer.learning_rate = 3e-4
    c.optimizer.warmup_steps = 30
    c.optimizer.warmup_fraction = placeholder(float)
    # The cross-encoder learns grounding late: at 400 steps re-ranking alone is below the
    # dot stage (val IR R@1 7.2 vs 8.3), at 800 it is well above (12.5).
    c.train.num_steps = 800


def _distill(c, learning_rate: float = 1e-4) -> None:
    """Thinking Fast and Slow: the towers learn the re-ranker's scores (--config.distill.
    teacher), starting from the fine-tuned towers (--config.init.model)."""
    c.model_kind = "lightningdot"
    c.tasks = {"distill": 1}
    c.distill.candidates = 4
    c.distill.sample_temperature = 0.05
    c.optimizer.learning_rate = learning_rate
    c.optimizer.warmup_steps = 30
    c.optimizer.warmup_fraction = placeholder(float)
    c.train.num_steps = 300


def _vldeformer(c) -> None:
    """Distillation with both towers initialized from the re-ranker itself
    (--config.init.text / init.image)."""
    _distill(c, learning_rate=3e-4)


# Each stage: (model preset, model kind (None: the preset's), what it changes).
STAGES = {
    "pretrain": ("scenes_small", "lightningdot_pretrain", _pretrain),
    "finetune": ("scenes_small", "lightningdot_pretrain", _finetune),
    "rerank": ("scenes_small_uniter", None, _rerank),
    "distill": ("scenes_small", "lightningdot_pretrain", _distill),
    "vldeformer": ("scenes_small", "lightningdot_pretrain", _vldeformer),
}


def _shared(c, cross: bool) -> None:
    """What every stage of the demo shares."""
    # From scratch at BERT's 0.02 init the pooled vectors of every input agree to a fraction
    # of a percent; 0.1 learns faster. No dropout: at init the inputs' vectors differ less
    # than dropout's noise, and with 0.1 dropout the contrastive loss collapses to ln(B) and
    # stays there for hundreds of steps (without it, it is at 2.2 after 500 steps).
    for side in ("transformer",) if cross else ("text", "image"):
        c.model[side].initializer_range = 0.1
        c.model[side].hidden_dropout = 0.0
        c.model[side].attention_dropout = 0.0
    c.data.name = "scenes"
    c.pipeline.batch_size = 128
    c.pipeline.text_buckets = (16, 24, 32)
    c.pipeline.region_buckets = (16,)
    c.pipeline.max_text_len = 30
    c.train.log_every = 50
    c.train.eval_batch_size = 200
    # Cosine scores at temperature 0.05 (CLIP / ALBEF): a short from-scratch run learns far
    # faster than with LightningDOT's raw dot products.
    c.loss.normalize = True
    c.loss.temperature = 0.05
    # Matryoshka prefixes, so the coarse-to-fine index has a trained 32-d prefix to search.
    c.loss.matryoshka_dims = (32,)


def _tiny(c, cross: bool) -> None:
    base.tiny(c)
    # The original's raw dot products (the tests compare runs to float32 rounding, which
    # a 1 / 0.05 score scale would amplify); the Matryoshka prefix stays for coarse-to-fine.
    c.loss.normalize, c.loss.temperature = False, placeholder(float)
    if c.loss.matryoshka_dims:
        c.loss.matryoshka_dims = (4,)
    if cross and c.itm.residual_scale is not None:  # raw dot products: not the cosine scale
        c.itm.residual_scale = 1.0


def get_config(arg: str = "pretrain"):
    stage, options = base.parse_arg(arg, tuple(STAGES), "pretrain", "ldot_jax/configs/demo.py")
    preset, kind, apply_stage = STAGES[stage]
    cross = stage == "rerank"
    c = base.base_config(preset, kind)
    _shared(c, cross)
    apply_stage(c)
    # One evaluation and one checkpoint, at the end.
    c.train.checkpoint_every = c.train.eval_every = c.train.num_steps
    if "tiny" in options:
        _tiny(c, cross)
    return c
