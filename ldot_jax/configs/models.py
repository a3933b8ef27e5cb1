"""Model presets: sizes and numerics of the dual encoder and the cross-encoder.

    from configs import models
    cfg = models.get_config("lightningdot_base")          # or "uniter_base", "scenes", "small", "tiny"
    model_config = ldot_jax.checkpoints.kinds.model_config(cfg.kind, cfg.model)

`lightningdot_base` is the released LightningDOT bi-encoder (bert-base-cased text tower,
UNITER-base image tower, 768-d vectors); `uniter_base` the UNITER-base ITM re-ranker; `small`
the size of the parity fixtures (hidden 32, 2 layers, 4 heads); `scenes` a 4-layer, 256-wide
bi-encoder for the built-in dataset (`scenes_uniter` its re-ranker), `scenes_small` (2 layers,
128 wide; `scenes_small_uniter`) the size `make demo` trains; `tiny` (`tiny_uniter`) the size
unit tests train.
Experiment configs take `model` from here and override fields, e.g.
`--config.model.text.dtype=bfloat16`.
"""

import ml_collections

_BERT_BASE = dict(vocab_size=28996, hidden_size=768, num_layers=12, num_heads=12,
                  intermediate_size=3072, max_position_embeddings=512)
_SMALL = dict(vocab_size=128, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
              max_position_embeddings=64)
# Sized for the built-in scenes dataset (vocabulary of 1000 wordpieces, 256-d regions, 37
# detector classes): big enough to learn it, small enough to train on a CPU.
_SCENES = dict(vocab_size=1000, hidden_size=256, num_layers=4, num_heads=4,
               intermediate_size=1024, max_position_embeddings=64)
# The demo's size: trains on 2 CPU cores within `make demo`'s 15 minutes.
_SCENES_SMALL = dict(_SCENES, hidden_size=128, num_layers=2, num_heads=4, intermediate_size=512)
_TINY = dict(vocab_size=64, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32,
             max_position_embeddings=32, hidden_dropout=0.0, attention_dropout=0.0)


def _dual(transformer, project_dim, feat_dim=2048, cls_token_id=101, num_classes=1601):
    return dict(text=dict(transformer), image=dict(transformer), project_dim=project_dim,
                region=dict(feat_dim=feat_dim, box_dim=7, num_classes=num_classes),
                cls_token_id=cls_token_id)


PRESETS = {
    "lightningdot_base": ("lightningdot", _dual(_BERT_BASE, 768)),
    "uniter_base": ("uniter_itm", dict(transformer=dict(_BERT_BASE),
                                       region=dict(feat_dim=2048, box_dim=7, num_classes=1601))),
    "small": ("lightningdot", _dual(_SMALL, 24)),
    "scenes": ("lightningdot", _dual(_SCENES, 256, feat_dim=256, cls_token_id=2,
                                     num_classes=37)),
    "tiny": ("lightningdot", _dual(_TINY, 8, feat_dim=32, cls_token_id=2)),
    "scenes_small": ("lightningdot", _dual(_SCENES_SMALL, 128, feat_dim=256, cls_token_id=2,
                                           num_classes=37)),
    # Re-rankers (UNITER ITM) for the built-in data and the tests.
    "scenes_small_uniter": ("uniter_itm", dict(transformer=dict(_SCENES_SMALL), region=dict(
        feat_dim=256, box_dim=7, num_classes=37))),
    "scenes_uniter": ("uniter_itm", dict(transformer=dict(_SCENES),
                                         region=dict(feat_dim=256, box_dim=7, num_classes=37))),
    "tiny_uniter": ("uniter_itm", dict(transformer=dict(_TINY),
                                       region=dict(feat_dim=32, box_dim=7, num_classes=37))),
}


def get_config(arg: str = "lightningdot_base") -> ml_collections.ConfigDict:
    if arg not in PRESETS:
        raise ValueError(f"unknown model preset {arg!r}; valid presets are {sorted(PRESETS)}")
    kind, model = PRESETS[arg]
    return ml_collections.ConfigDict({"kind": kind, "model": model})
