"""Evaluator rerank_recall: recall of a cross-encoder re-ranking a frozen dual encoder's top.

    config.evals.val = dict(type="rerank_recall", split="val", top=20,
                            dual="runs/demo/finetune/model")

The dual encoder's exact dot-product top `top` of every caption and image query of the split,
re-ranked by the cross-encoder being trained (two_stage.rerank_recall). Keys: split (default
data.eval_split), top (default 20), dual (a dual encoder's model directory; default itm.dual,
the directory that draws the itm task's negatives).
"""

from __future__ import annotations

from ldot_jax.checkpoints import kinds
from ldot_jax.evaluation import two_stage
from ldot_jax.evaluation.evaluators import common


class Evaluator:
    metrics = common.RECALL_METRICS

    def __init__(self, context: common.EvalContext, split: str | None = None, top: int = 20,
                 dual: str | None = None):
        if kinds.get(context.kind).is_dual_encoder:
            raise ValueError(f"rerank_recall evaluates a cross-encoder; model kind "
                             f"{context.kind!r} is a dual encoder (use dot_recall)")
        directory = dual or (context.config.get("itm") or {}).get("dual")
        if not directory:
            raise ValueError("rerank_recall needs `dual`: the model directory of the dual "
                             "encoder whose top it re-ranks (default itm.dual, not set)")
        self.dual = context.models.load(directory)
        if not kinds.get(self.dual.kind).is_dual_encoder:
            raise ValueError(f"rerank_recall: dual={directory} holds a {self.dual.kind!r} "
                             f"model; expected one of {kinds.dual_encoder_kinds()}")
        self.context = context
        self.split = split or context.config.data.get("eval_split")
        if not self.split:
            raise ValueError("rerank_recall needs a split (or data.eval_split)")
        self.top = int(top)
        self.images, self.captions = context.split(self.split)

    def run(self, params, progress: bool = False) -> dict[str, float]:
        c = self.context
        return two_stage.rerank_recall((self.dual.module, self.dual.params), (c.model, params),
                                       self.images, self.captions, c.config, c.mesh,
                                       top=self.top, progress=progress)
