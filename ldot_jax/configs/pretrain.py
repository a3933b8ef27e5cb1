"""LightningDOT pre-training (VMLM + SMRM (MRFR, MRC-kl) + CMR) on UNITER feature databases.

First convert the original's LMDBs once (soft labels kept for MRC-kl; README "Datasets"):

    python - <<'PY'
    from ldot_jax.data import datasets, uniter_db
    config = uniter_db.uniter_config("pretrain_coco", {
        "train": ("txt_db/pretrain_coco_train.db", "img_db/coco_train2014"),
        "val": ("txt_db/pretrain_coco_val.db", "img_db/coco_val2014")}, soft_labels=True)
    datasets.prepare(datasets.UniterDb(config=config, data_dir="data"))
    PY

then, with BERT-base-cased and UNITER-base converted by `ldot convert`:

    ldot train --config=ldot_jax/configs/pretrain.py --workdir=runs/pretrain \\
        --config.data.name=data/ldot_uniter_db/pretrain_coco/1.0.0 \\
        --config.data.vocab=bert-base-cased/vocab.txt \\
        --config.init.text=models/bert-base-cased --config.init.image=models/uniter-base

The recipe is the original's: 300k updates, lr 5e-5 with 10k warm-up then linear decay, AdamW
β = (0.9, 0.98), eps 1e-6, weight decay 0.01, clip 5.0, one task per update mixed
CMR 16 : VMLM 8 : MRFR 4 : MRC-kl 4 (the COCO / SBU ratios; `:vg_cc` gives VG / CC's
16 : 12 : 6 : 6). The original batches by a token budget (10,240 tokens per GPU); here the
global batch is fixed (1,024 captions over all devices) and negatives are global.
bf16 on accelerators: `--config.model.text.dtype=bfloat16 --config.model.image.dtype=bfloat16`.
"""

from ldot_jax.configs import base

MIXES = {"coco_sbu": {"cmr": 16, "vmlm": 8, "mrfr": 4, "mrckl": 4},
         "vg_cc": {"cmr": 16, "vmlm": 12, "mrfr": 6, "mrckl": 6}}


def get_config(arg: str = "coco_sbu"):
    mix, options = base.parse_arg(arg, tuple(MIXES), "coco_sbu", "ldot_jax/configs/pretrain.py")
    c = base.base_config("lightningdot_base", "lightningdot_pretrain")
    base.pretraining_recipe(c)
    c.tasks = dict(MIXES[mix])
    c.data.name = "data/ldot_uniter_db/pretrain_coco/1.0.0"  # a converted UNITER LMDB
    c.data.eval_split = "val"
    c.pipeline.batch_size = 1024
    c.train.num_steps = 300_000
    c.train.eval_every = 10_000
    c.train.checkpoint_every = 5_000
    c.train.log_every = 100
    if "tiny" in options:
        base.tiny(c)
    return c
