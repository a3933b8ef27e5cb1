"""Evaluator dot_recall: dot-product IR / TR recall of a dual encoder on a split.

    config.evals.val = dict(type="dot_recall", split="val", every=2000)

Every image and caption of the split is embedded once (extract.embed_split) and each query
ranks the whole other side (recall.retrieval_metrics); on data that knows which captions are
true of which images (the scenes), caption-true recall too (ct_*), and its IR R@1 per kind
of caption (ct_ir_r1_partial, _count, _count_all, _relation: what a model fails at). Keys:
split (default data.eval_split).
"""

from __future__ import annotations

from ldot_jax.checkpoints import kinds
from ldot_jax.data import scenes_truth
from ldot_jax.evaluation import recall
from ldot_jax.evaluation.evaluators import common
from ldot_jax.retrieval import extract


class Evaluator:
    metrics = common.RECALL_METRICS

    def __init__(self, context: common.EvalContext, split: str | None = None):
        if not kinds.get(context.kind).is_dual_encoder:
            raise ValueError(f"dot_recall evaluates a dual encoder; model kind "
                             f"{context.kind!r} holds none (dual-encoder kinds: "
                             f"{kinds.dual_encoder_kinds()})")
        self.context = context
        self.split = split or context.config.data.get("eval_split")
        if not self.split:
            raise ValueError("dot_recall needs a split (or data.eval_split)")
        self.images, self.captions = context.split(self.split)
        # Data that can tell which captions are true of which images adds caption-true recall.
        self.truth = context.caption_truth(self.split)
        self.kinds, self.kind_names = None, ()
        if self.truth is not None:
            self.metrics = common.RECALL_METRICS + common.CAPTION_TRUE_METRICS
            # … and its IR R@1 per kind of caption, when the data can tell the kinds.
            self.kinds = context.caption_kinds(self.split)
            if self.kinds is not None:
                self.kind_names = tuple(k for k in scenes_truth.KINDS if (self.kinds == k).any())
                self.metrics += tuple(f"ct_ir_r1_{k}" for k in self.kind_names)

    def run(self, params, progress: bool = False) -> dict[str, float]:
        c = self.context
        image_vectors, text_vectors, caption_image = extract.embed_split(
            c.model, params, self.images, self.captions, c.config, c.mesh, progress)
        return recall.retrieval_metrics(text_vectors, image_vectors, caption_image,
                                        truth=self.truth, kinds=self.kinds,
                                        kind_names=self.kind_names)
