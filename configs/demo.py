"""The scenes demo: LightningDOT pre-training and fine-tuning on the built-in scenes data.

    python -m ldot_jax.main --config=configs/demo.py:pretrain --workdir=runs/demo/pretrain
    python -m ldot_jax.main --config=configs/demo.py:finetune --workdir=runs/demo/finetune \\
        --config.init.model=runs/demo/pretrain/model

Stages (the first part of the argument):
  pretrain  VMLM, MRFR, MRC-kl and CMR mixed 8 : 4 : 4 : 16 (the original's COCO/SBU ratios),
            the pre-training recipe, from scratch (the 4-layer `scenes` model preset);
  finetune  CMR only with the fine-tuning recipe (lr 2e-5 → 1e-4 here: a small model from a
            short pre-training), global negatives.
Add `,tiny` (e.g. `configs/demo.py:pretrain,tiny`) for a seconds-long run on a 48-image
scenes set with the `tiny` model: what the tests run.

The scenes data (30k training images) is generated on first use (about a minute on 2 cores).
"""

from configs import base

STAGES = ("pretrain", "finetune")


def get_config(arg: str = "pretrain"):
    stage, options = base.parse_arg(arg, STAGES, "pretrain", "configs/demo.py")
    c = base.base_config("scenes", "lightningdot_pretrain")
    c.data.name = "scenes"
    c.pipeline.batch_size = 128
    c.pipeline.text_buckets = (16, 24, 32)
    c.pipeline.region_buckets = (16,)
    c.pipeline.max_text_len = 30
    c.train.log_every = 50
    c.train.eval_batch_size = 200
    if stage == "pretrain":
        base.pretraining_recipe(c)
        c.tasks = {"cmr": 16, "vmlm": 8, "mrfr": 4, "mrckl": 4}
        c.optimizer.learning_rate = 3e-4
        c.optimizer.warmup_steps = 100
        c.train.num_steps = 1_500
        c.train.eval_every = 500
        c.train.checkpoint_every = 500
    else:
        c.model_kind = "lightningdot"
        c.tasks = {"cmr": 1}
        c.optimizer.learning_rate = 1e-4
        c.train.num_epochs = 2.0
        c.train.eval_every = 500
        c.train.checkpoint_every = 500
    if "tiny" in options:
        base.tiny(c)
    return c
