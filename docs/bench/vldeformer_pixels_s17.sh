#!/usr/bin/env bash
# VLDeformer on the pixel path (issue 19, session 17): the patch re-ranker as a full scorer,
# the towers decomposed from it, against its own all-pairs recall and towers from scratch.
#
#   docs/bench/vldeformer_pixels_s17.sh [RUNS]    (RUNS default runs/vldeformer_pixels)
#   TINY=1 docs/bench/vldeformer_pixels_s17.sh /tmp/v   (seconds: the tests' tiny configs)
#
# 1. towers    the pixel demo's towers (900 CMR steps × 256 from scratch): the re-ranker's
#              initialization and hard negatives;
# 2. rerank    the patch re-ranker, 800 steps, as a FULL scorer (stage rerank_full: its
#              rank logit alone is trained to rank, so its all-pairs recall is meaningful);
# 3. vldeformer  both towers initialized from it (text: its words and layers; ViT: its ViT)
#              and decomposed by 300 steps of CMR + distillation from it;
# 4. scratch   300 CMR steps from scratch at the vldeformer stage's batch (128);
# then `ldot evaluate` on the test split (200 caption and 50 image queries against all 1,000
# images and 5,000 captions): the decomposed towers with the re-ranker at M = 5,000 (the
# re-ranker on all pairs), the scratch and the demo towers' dot stage.
set -euo pipefail
RUNS=${1:-runs/vldeformer_pixels}
LDOT=${LDOT:-.venv/bin/ldot}
CFG=ldot_jax/configs/demo_pixels.py
DATA=$RUNS/data
opt=""
ms=5000
scratch=(--config.train.num_steps=300 --config.pipeline.batch_size=128)
if [[ -n "${TINY:-}" ]]; then
  opt=",tiny"; ms=20; scratch=()
fi
train() {  # stage workdir [overrides…]
  local stage=$1 dir=$2
  shift 2
  if [[ -f $dir/model/ldot_config.json ]]; then echo "reusing $dir"; return; fi
  /usr/bin/time -f "$stage: %e s" "$LDOT" train --config="$CFG:$stage$opt" --workdir="$dir" \
    --config.data.data_dir="$DATA" "$@"
}
train towers "$RUNS/towers"
train rerank_full "$RUNS/rerank" --config.init.model="$RUNS/towers/model" \
  --config.itm.dual="$RUNS/towers/model"
R=$RUNS/rerank/model
train vldeformer "$RUNS/vldeformer" --config.init.text="$R" --config.init.image="$R" \
  --config.distill.teacher="$R"
train towers "$RUNS/scratch" "${scratch[@]}"
common=(--reranker "$R" --split test --max_queries 200 --max_image_queries 50)
"$LDOT" evaluate --workdir "$RUNS/vldeformer" "${common[@]}" --ms "$ms" \
  --out "$RUNS/eval/vldeformer"
for run in scratch towers; do
  "$LDOT" evaluate --workdir "$RUNS/$run" "${common[@]}" --ms 10 --out "$RUNS/eval/$run"
done
