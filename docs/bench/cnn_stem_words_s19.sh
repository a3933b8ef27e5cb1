#!/usr/bin/env bash
# The pixel towers with the cnn stem and the words loss (issue 19, session 19; BENCHMARKS.md
# "Shapes learned, recall barely moved"): the pixel demo's towers stage (CMR from scratch,
# batch 256, val evaluated by the training evaluation at the last step, all 5,000 captions)
# with
#   cnn        model.pixels.stem=cnn (models/vit.CnnStem), 450 steps;
#   cnn_words  the same + loss.words_weight=0.1 (training/losses.words_loss);
#   patch_words  the pixel demo's ViT (16-px linear patches) + loss.words_weight=0.1, 900 steps
#              (the demo's own run without it: BENCHMARKS.md, session 17–18 rows).
#
#   docs/bench/cnn_stem_words_s19.sh [RUNS]    (RUNS default runs/cnn_stem_s19)
# Each run's val numbers: the last "eval" row of RUNS/<name>/metrics.jsonl.
set -euo pipefail
RUNS=${1:-runs/cnn_stem_s19}
LDOT=${LDOT:-.venv/bin/ldot}
CONFIG=--config=ldot_jax/configs/demo_pixels.py:towers
HALF=(--config.train.num_steps=450 --config.train.eval_every=450
      --config.train.checkpoint_every=450)
"$LDOT" train "$CONFIG" --workdir="$RUNS/cnn" --config.model.pixels.stem=cnn "${HALF[@]}"
"$LDOT" train "$CONFIG" --workdir="$RUNS/cnn_words" --config.model.pixels.stem=cnn \
    --config.loss.words_weight=0.1 "${HALF[@]}"
"$LDOT" train "$CONFIG" --workdir="$RUNS/patch_words" --config.loss.words_weight=0.1
for run in cnn cnn_words patch_words; do
  echo "$run: $(grep '"eval"' "$RUNS/$run/metrics.jsonl" | tail -1)"
done
