#!/usr/bin/env bash
# Reproduces the bundled default weights (napari_langmamba/weights/default) on a CPU machine
# from the real series in ../shared/data. Every step writes a run folder under $RUNS and can be
# continued with --resume; the last step bundles the best checkpoints (float16) into the package.
# Usage: scripts/train_default_weights.sh [RUNS_DIR]     (the venv of `make run` must exist)
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-runs/default}
PY=.venv/bin/python
SERIES=${LANGMAMBA_SHARED_DATA:-../shared/data}/ct/abdomen_dicom_series
mkdir -p "$RUNS"

# Quarter-dose pairs by projection-domain noise insertion (calibrated defaults).
$PY -m training simulate --input "$SERIES" --out "$RUNS/pairs" --dose 0.25 --workers 2
# Candidate token pools: the offline, text-only lexicon prior on the MiniLM vocabulary.
$PY -m training candidates --data "$RUNS/pairs" --output "$RUNS/pools.json" --codebook minilm --scorer lexicon
# Stage 1: LangAE lite (the last 15 % of the slices are held out for validation).
$PY -m training langae --data "$RUNS/pairs" --val-fraction 0.15 --output "$RUNS/langae-lite" \
    --preset lite --codebook minilm --candidates "$RUNS/pools.json" --patch-size 128 --batch-size 4 \
    --repeat 16 --epochs "${LANGAE_EPOCHS:-3}" --lr 2e-4 --disc-start 100000 --checkpoint-every 25
# Stage 2: SEED lite + LangDA, and the MSE-only baseline trained the same way.
for lambda in "${LANGDA_WEIGHT:-0.001}" 0; do
  $PY -m training seed --data "$RUNS/pairs" --val-fraction 0.15 --val-max-images 3 \
      --langae "$RUNS/langae-lite/best" --output "$RUNS/seed-lite-lambda$lambda" --preset lite \
      --backbone seed --lambda "$lambda" --lr 5e-4 --patch-size 64 --batch-size 8 --repeat 8 \
      --epochs "${SEED_EPOCHS:-30}" --checkpoint-every 20
  $PY -m training evaluate --data "$RUNS/pairs" --held-out 0.15 --checkpoint "$RUNS/seed-lite-lambda$lambda/best" \
      --out "$RUNS/eval-lambda$lambda"
done
$PY scripts/bundle_weights.py --seed-run "$RUNS/seed-lite-lambda${LANGDA_WEIGHT:-0.001}" \
    --langae-run "$RUNS/langae-lite" --evaluation "$RUNS/eval-lambda${LANGDA_WEIGHT:-0.001}/evaluation.json" \
    --baseline-evaluation "$RUNS/eval-lambda0/evaluation.json" --overwrite
