"""The pixel demo: a ViT image tower and a BERT text tower trained from scratch on the scenes'
rendered pictures (64 × 64, 4 × 4 patches), beside the region demo (configs/demo.py).

    ldot train --config=ldot_jax/configs/demo_pixels.py:towers --workdir=runs/pixels/towers

Stages (the first part of the argument):
  towers  CMR (in-batch contrastive) with the fine-tuning recipe, from scratch: the ViT reads
          the stored pictures ({"pixels": uint8[B, 64, 64, 3]}, 16-px patches), the text tower
          is the region demo's (`scenes_small`'s 2 layers, 128 wide); Matryoshka loss on the
          32-d prefix; 900 steps of 256.
  rerank  the patch re-ranker (UNITER single stream over the caption and its own ViT's
          patch tokens, initialized from the towers), trained as the region demo's re-ranker:
    ldot train --config=ldot_jax/configs/demo_pixels.py:rerank --workdir=runs/pixels/rerank \\
        --config.init.model=runs/pixels/towers/model --config.itm.dual=runs/pixels/towers/model
  distill Thinking Fast and Slow: the towers (--config.init.model) learn the patch
          re-ranker's scores (--config.distill.teacher); --config.distill.residual=True makes
          the teacher's score the student's own plus the re-ranker's (its fused score).
  rerank_full  the patch re-ranker as a full scorer (no residual to the dot score): the
          teacher VLDeformer decomposes.
  vldeformer  the same as distill, both towers initialized from the patch re-ranker
          (--config.init.text and --config.init.image = its model directory).
What it reaches (BENCHMARKS.md, "The pixel path"): val CT IR R@1 28.4 after the towers (the
region towers: 44.7 at equal time); the patch re-ranker helps image → caption queries, not
caption → image ones; distillation is level with more CMR steps. Slower and better
(BENCHMARKS.md, session 20): the cnn stem at 32-64-128 channels with max pooling, 450 steps,
then 450 more with negatives mined by it (`ldot mine`, pipeline.mined_negatives) reach CT IR
R@1 34.9 in ~1,050 s.
Add `,tiny` for a seconds-long run on a 48-image scenes set at 16 × 16 pixels (the tests).
"""

import ml_collections

from ldot_jax.configs import base
from ldot_jax.configs import demo
from ldot_jax.data import scenes_builder

# The ViT for 64 × 64 scenes pictures: 4 × 4 patches of 16 px, the text tower's width and
# depth, GELU, mean pooling of the patch tokens. Measured on val at equal time (BENCHMARKS.md):
# 16-px patches train ~2.5× faster per step than 8-px ones and reach the same recall, mean
# pooling is a little better than the class token, batch 256 a little better than 128.
IMAGE_SIZE, PATCH_SIZE, POOL, STEM = 64, 16, "avg", "patch"


def _vit(c, width: int, layers: int, heads: int, image_size: int, patch_size: int,
         pool: str = POOL, stem: str = STEM) -> None:
    c.model.image_tower = "vit"
    c.model.image = ml_collections.ConfigDict(dict(
        c.model.image.to_dict(), hidden_size=width, num_layers=layers, num_heads=heads,
        intermediate_size=4 * width))
    c.model.pixels = ml_collections.ConfigDict(
        {"image_size": image_size, "patch_size": patch_size, "pool": pool, "stem": stem,
         "stem_channels": ()})
    if image_size != scenes_builder.IMAGE_SIZE:  # else the region demo's data as it is
        c.data.overrides.image_size = image_size
    if "transformer" in c.model:  # the patch re-ranker: its regions are the ViT's tokens
        c.model.region.feat_dim = width


def _towers(c) -> None:
    """The region demo's fine-tuning recipe, from scratch, at a ViT's learning rate (1e-3:
    at 3e-4 val recall is ~2 points lower after the same time), batch 256."""
    demo._finetune(c)
    c.model_kind = "lightningdot"
    c.optimizer.learning_rate = 1e-3
    c.pipeline.batch_size = 256
    c.train.num_steps = 900


def _rerank(c) -> None:
    """The patch re-ranker: UNITER's single stream over a caption and its own ViT's class and
    patch tokens (initialized from the pixel towers, --config.init.model: the ViT from the
    image tower, words and layers from the text tower), hard negatives from the same towers
    (--config.itm.dual); the region demo's objective."""
    demo._rerank(c)


def _rerank_full(c) -> None:
    """The patch re-ranker as a full scorer (VLDeformer's teacher): no residual to the dot
    score (itm.residual_scale None), so its rank logit alone is trained to rank and its
    all-pairs recall means something."""
    _rerank(c)
    c.itm.residual_scale = None


def _distill(c) -> None:
    """Thinking Fast and Slow on pixels: the towers (--config.init.model) learn the patch
    re-ranker's scores (--config.distill.teacher) of each query's positive and hard
    candidates; the region demo's distillation settings."""
    demo._distill(c)
    c.model_kind = "lightningdot"


def _vldeformer(c) -> None:
    """VLDeformer on pixels: the towers initialized from the patch re-ranker itself
    (--config.init.text / --config.init.image = its model directory: the text tower from its
    words and layers, the ViT from its ViT; the projections start fresh) and decomposed by
    CMR + distillation from it (--config.distill.teacher); the region demo's settings."""
    demo._vldeformer(c)
    c.model_kind = "lightningdot"


STAGES = {"towers": ("scenes_small", "lightningdot", _towers),
          "rerank": ("scenes_small_uniter", None, _rerank),
          "rerank_full": ("scenes_small_uniter", None, _rerank_full),
          "distill": ("scenes_small", "lightningdot", _distill),
          "vldeformer": ("scenes_small", "lightningdot", _vldeformer)}


def get_config(arg: str = "towers"):
    stage, options = base.parse_arg(arg, tuple(STAGES), "towers",
                                    "ldot_jax/configs/demo_pixels.py")
    preset, kind, apply_stage = STAGES[stage]
    cross = stage.startswith("rerank")
    c = base.base_config(preset, kind)
    if cross:  # the re-ranker's own ViT, configured like the towers' image side
        c.model.image = ml_collections.ConfigDict(dict(c.model.transformer.to_dict()))
    demo._shared(c, cross)
    apply_stage(c)
    c.train.checkpoint_every = c.train.eval_every = c.train.num_steps
    if "tiny" in options:
        demo._tiny(c, cross)
        if cross:
            c.model.image = ml_collections.ConfigDict(dict(c.model.transformer.to_dict()))
        image = c.model.image
        _vit(c, image.hidden_size, image.num_layers, image.num_heads, 16, 4)
    else:
        _vit(c, 128, 2, 4, IMAGE_SIZE, PATCH_SIZE)
    return c
