"""Fine-tuning LightningDOT for retrieval on Coco (Karpathy split).

    ldot train --config=ldot_jax/configs/finetune_coco.py --workdir=runs/ft_coco \\
        --config.data.manual_dir=data/coco --config.data.vocab=bert-base-cased/vocab.txt \\
        --config.init.model=models/lightningdot-pretrained

`data/coco` holds dataset_coco.json and features/ (README "Datasets"); `init.model` is a
pre-trained LightningDOT (converted with `ldot convert --kind
lightningdot_pretrain`, or runs/pretrain/model). The recipe is the original's: CMR only,
batch 64 captions, lr 2e-5, AdamW β = (0.9, 0.999) eps 1e-8 no weight decay, 10% warm-up then
linear decay, clip 2.0, 20 epochs; model selection on val by AR (the mean of IR / TR
R@1/5/10), test 5,000 images / 25,010 captions. The original's negatives were per GPU: `--config.loss.negatives=local`
reproduces them; global negatives (the default) use the whole batch.
"""

from ldot_jax.configs import base


def get_config(arg: str = ""):
    return base.finetune_karpathy("coco", 20.0, arg)
