"""Fine-tuning LightningDOT for retrieval on Flickr30k (Karpathy split).

    ldot train --config=ldot_jax/configs/finetune_flickr30k.py --workdir=runs/ft_flickr30k \\
        --config.data.manual_dir=data/flickr30k --config.data.vocab=bert-base-cased/vocab.txt \\
        --config.init.model=models/lightningdot-pretrained

`data/flickr30k` holds dataset_flickr30k.json and features/ (README "Datasets"); `init.model` is a
pre-trained LightningDOT (converted with `ldot convert --kind
lightningdot_pretrain`, or runs/pretrain/model). The recipe is the original's: CMR only,
batch 64 captions, lr 2e-5, AdamW β = (0.9, 0.999) eps 1e-8 no weight decay, 10% warm-up then
linear decay, clip 2.0, 15 epochs; model selection on val by AR (the mean of IR / TR
R@1/5/10), test 1,000 images / 5,000 captions. The original's negatives were per GPU: `--config.loss.negatives=local`
reproduces them; global negatives (the default) use the whole batch.
"""

from ldot_jax.configs import base


def get_config(arg: str = ""):
    return base.finetune_karpathy("flickr30k", 15.0, arg)
