#!/usr/bin/env bash
# The pixel towers with a wider cnn stem and max pooling, continued with and without negatives
# mined over the training split (issue 19, session 20; BENCHMARKS.md "More steps and mined
# negatives teach the pixel towers some shape"). The pixel demo's towers stage (CMR from
# scratch, batch 256, val evaluated by the training evaluation at the last step, all 5,000
# captions) with model.pixels.stem=cnn, stem_channels=(32,64,128), pool=max:
#   wide_max        450 steps from scratch;
#   wide_max_lr3    the same at optimizer.learning_rate=3e-3;
#   wide_max_words  the same + loss.words_weight=1.0;
#   wide_max_cont   450 more steps from wide_max's model (a fresh warm-up and cosine decay);
#   wide_max_mined  the same, its batches half anchors, half images mined by wide_max over
#                   the 30,000 training pictures (`ldot mine`, k = 20);
#   deep_max        stem_channels=(32,64,128,128): a fourth 3 × 3 convolution, 450 steps.
# Then docs/bench/shape_use_s20.py on each run: do its vectors carry shape?
#
#   docs/bench/mined_pixels_s20.sh [RUNS]    (RUNS default runs/mined_pixels_s20)
set -euo pipefail
RUNS=${1:-runs/mined_pixels_s20}
LDOT=${LDOT:-.venv/bin/ldot}
PYTHON=${PYTHON:-.venv/bin/python}
STEPS=(--config.train.num_steps=450 --config.train.eval_every=450
       --config.train.checkpoint_every=450)
# Each option once: ml_collections' flags append a repeated tuple override to the first.
towers() {
  local name=$1 channels=$2
  shift 2
  "$LDOT" train --config=ldot_jax/configs/demo_pixels.py:towers --workdir="$RUNS/$name" \
      --config.model.pixels.stem=cnn --config.model.pixels.pool=max \
      "--config.model.pixels.stem_channels=$channels" "${STEPS[@]}" "$@"
}
towers wide_max "(32,64,128)"
towers wide_max_lr3 "(32,64,128)" --config.optimizer.learning_rate=3e-3
towers wide_max_words "(32,64,128)" --config.loss.words_weight=1.0
towers wide_max_cont "(32,64,128)" --config.init.model="$RUNS/wide_max/model"
"$LDOT" mine --workdir="$RUNS/wide_max" --out="$RUNS/wide_max_mined.npz"
towers wide_max_mined "(32,64,128)" --config.init.model="$RUNS/wide_max/model" \
    --config.pipeline.mined_negatives="$RUNS/wide_max_mined.npz"
towers deep_max "(32,64,128,128)"
for run in wide_max wide_max_lr3 wide_max_words wide_max_cont wide_max_mined deep_max; do
  echo "$run: $(grep '"eval"' "$RUNS/$run/metrics.jsonl" | tail -1)"
  echo "$run: $("$PYTHON" docs/bench/shape_use_s20.py "$RUNS/$run")"
done
