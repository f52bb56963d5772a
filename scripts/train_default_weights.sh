#!/usr/bin/env bash
# Reproduces the bundled default weights (napari_langmamba/weights/default) on a CPU machine from
# the real CT in ../shared/data. Split by patient: L192 is the validation patient (model selection
# and every reported number); it is never trained on. Every step writes a run folder under $RUNS
# and can be continued with --resume; the last step bundles the best checkpoints (float16).
# Usage: scripts/train_default_weights.sh [RUNS_DIR]     (the venv of `make run` must exist)
#
# Two cores run the two trainings side by side best with one thread each (no oversubscription).
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-runs/default}
PY=.venv/bin/python
CT=${LANGMAMBA_SHARED_DATA:-../shared/data}/ct
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} NUMBA_NUM_THREADS=${NUMBA_NUM_THREADS:-1}
mkdir -p "$RUNS/data/chest_train" "$RUNS/data/chest_heldout"

# The chest volume (another scanner and kernel): 15 contiguous slices (z -123 .. -81 mm, lungs and
# heart) are held out of every training for the token-agreement and generalisation checks.
$PY - "$CT/chest_ct_B70f" "$RUNS/data" <<'EOF'
import os, sys
from pathlib import Path
import pydicom
src, out = Path(sys.argv[1]), Path(sys.argv[2])
for f in sorted(src.glob("*.dcm")):
    z = float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2])
    link = out / ("chest_heldout" if -123.0 <= z <= -81.0 else "chest_train") / f.name
    if not link.exists():
        os.symlink(f.resolve(), link)
EOF

NDCT=("$CT/mayo2016_L096_full_dose" "$RUNS/data/chest_train" "$CT/abdomen_dicom_series" "$CT/ge_abdomen_3slice"
      "$CT/mayo2016_pairs/L096/full_3mm_D45" "$CT/mayo2016_pairs/L143/full_3mm_D45"
      "$CT/mayo2016_pairs/L143/full_3mm_B30" "$CT/mayo2016_pairs/L286/full_3mm_D45")
VAL=("$CT/mayo2016_pairs/L192/full_3mm_D45" "$CT/mayo2016_pairs/L192/full_3mm_B30")

# Stage 1a: LangAE lite on all normal-dose CT but L192, reconstruction only (it fixes the encoder
# layers SEED uses; the bundled run was stopped at step 83). Stage 1b: those layers frozen, the
# anatomy prior on at the paper's alpha 0.3 (309 steps: the semantic loss did not move). Stage 1c:
# alpha 50, which makes the words follow the tissue classes within ~100 steps; stage 1d starts from
# its best checkpoint on L192 (reconstruction PSNR).
$PY -m training langae --data "${NDCT[@]}" --val-data "${VAL[@]}" --val-max-images 11 --output "$RUNS/langae-A" \
    --preset lite --codebook words:minilm --patch-size 128 --batch-size 8 --steps-per-epoch 50 \
    --epochs "${LANGAE_A_EPOCHS:-3}" --lr 3e-4 --gamma 0 --alpha 0 --checkpoint-every 50
for stage in "B 0.3 ${LANGAE_B_EPOCHS:-8} $RUNS/langae-A/last" "B2 50 ${LANGAE_B2_EPOCHS:-17} $RUNS/langae-B/last"; do
  read -r name alpha epochs init <<<"$stage"
  $PY -m training langae --data "${NDCT[@]}" --val-data "${VAL[@]}" --val-max-images 11 --output "$RUNS/langae-$name" \
      --preset lite --codebook words:minilm --init "$init" --freeze-features --alpha "$alpha" \
      --patch-size 256 --batch-size 2 --steps-per-epoch 40 --epochs "$epochs" --lr 3e-4 --gamma 0 --checkpoint-every 40
done
# Stage 1d: the word head alone (the encoder layers after SEED's features, and quant_conv) on the
# semantic and commitment losses, whole slices, selected by word agreement on L192 (the bundled run
# peaked at step 40 and was stopped at step 102). SEED's layers never move. The reconstruction of
# the unchanged decoder stayed at 14.5 dB, so no --train-part decoder stage follows (one on 2 x 256^2
# crops at lr 3e-4 only lowered it, to 11.4-14.1 dB over 150 steps).
$PY -m training langae --data "${NDCT[@]}" --val-data "${VAL[@]}" --val-max-images 11 --output "$RUNS/langae-W" \
    --preset lite --codebook words:minilm --init "$RUNS/langae-B2/best" --train-part words --alpha 1 --gamma 0 \
    --lr 3e-4 --batch-size 6 --patch-size 512 --epochs "${LANGAE_W_EPOCHS:-8}" --steps-per-epoch 20 --checkpoint-every 20
# Stages 1e-1f: the word head again, now with the region-pixel head (--region-pixels: each latent
# position's own 16 x 16 pixels through a small MLP added after quant_conv; it starts at zero).
# 1e at lr 3e-4 (the bundled run's best, 83.8 %, came at step 20; it was stopped after step 40);
# 1f from there with rare pools weighted up (--pool-balance 0.5) at lr 1e-4: best 85.2 % at step 60,
# bundled. (The bundled 1e started from the float16 bundle of 1d, i.e. langae-W's step 40.)
WORDS=(--data "${NDCT[@]}" --val-data "${VAL[@]}" --val-max-images 11 --preset lite --codebook words:minilm
       --train-part words --region-pixels --alpha 1 --gamma 0 --batch-size 6 --patch-size 512 --steps-per-epoch 20
       --checkpoint-every 20)
$PY -m training langae "${WORDS[@]}" --output "$RUNS/langae-R" --init "$RUNS/langae-W/best" --lr 3e-4 \
    --epochs "${LANGAE_R_EPOCHS:-2}"
$PY -m training langae "${WORDS[@]}" --output "$RUNS/langae-R3" --init "$RUNS/langae-R/best" --lr 1e-4 \
    --pool-balance 0.5 --epochs "${LANGAE_R3_EPOCHS:-4}"
# Stage 1g: the head's first layer widened to 3 x 3 latent positions (the 1 x 1 head becomes its centre
# tap), so that lung (air inside the body) is told from the air outside; best 85.8 % at step 20.
$PY -m training langae "${WORDS[@]}" --output "$RUNS/langae-C" --init "$RUNS/langae-R3/best" --lr 1e-4 \
    --pool-balance 0.5 --region-context 3 --epochs "${LANGAE_C_EPOCHS:-3}"
# Stage 1h: rare tissue classes weighted up (each region counted by its majority class, not by its
# pool of classes, so that a rare mix of air and fat does not weigh more); best 87.3 % at step 20, bundled.
$PY -m training langae "${WORDS[@]}" --output "$RUNS/langae-M" --init "$RUNS/langae-C/best" --lr 1e-4 \
    --pool-balance 0.75 --balance-by class --region-context 3 --epochs "${LANGAE_M_EPOCHS:-2}"
# Stage 1x: the region-pixel MLP replaced by a CNN head that sees ~127 x 127 pixels around each
# word (--region-head cnn), trained alone (the whole encoder frozen): its tissue classifier first
# (--tissue-steps 1500, 6.6 minutes: 99.5 % of L192's dominated regions), then its words at lr 5e-4;
# best 90.8 % at step 100 of 150. (1u, the same with 600 tissue steps and 200 word steps:
# 89.9 %; 1v, 1u's best at lr 1.5e-4: 90.0 %; neither bundled.)
REGION=(--data "${NDCT[@]}" --val-data "${VAL[@]}" --val-max-images 11 --preset lite --codebook words:minilm
        --train-part region --region-pixels --region-head cnn --alpha 1 --gamma 0 --batch-size 4 --patch-size 512
        --steps-per-epoch 25 --checkpoint-every 25 --pool-balance 0.75 --balance-by class --tissue-steps 1500
        --lr 5e-4)
$PY -m training langae "${REGION[@]}" --output "$RUNS/langae-U2" --init "$RUNS/langae-M/best" \
    --epochs "${LANGAE_U2_EPOCHS:-6}"
# Stage 1y: the head's view widened to nearly the whole slice (--region-wide: the lung's interior
# is no longer taken for the air outside), its classifier retrained (99.7 % of L192's dominated
# regions), and each word chosen among the words of the tissue it predicts (--word-choice tissue;
# the word steps then train the head's offset alone); best 99.66 % at step 25 of 50.
$PY -m training langae "${REGION[@]}" --output "$RUNS/langae-Y" --init "$RUNS/langae-U2/best" --region-wide \
    --word-choice tissue --epochs "${LANGAE_Y_EPOCHS:-2}"
# Stage 1z: 1y's head refit to the tissue prior with its lumen rule (a calcified aorta's lumen is blood,
# not bone): 1500 tissue steps, 25 offset steps; 99.79 %, bundled.
$PY -m training langae "${REGION[@]}" --output "$RUNS/langae-Z" --init "$RUNS/langae-Y/best" --region-wide \
    --word-choice tissue --epochs "${LANGAE_Z_EPOCHS:-1}"

# Stage 2: SEED lite on the real pairs of L096, L143, L286 (25 slices, kernels D45 and B30), MSE
# only; L192 selects the checkpoint. (Mixing in simulated 5 %/10 % chest pairs, --data SIM...,
# scored lower on L192: see the README.)
$PY -m training seed --pairs "$CT/mayo2016_pairs" --val-patients L192 \
    --langae "$RUNS/langae-A/last" --preset lite --backbone seed --lambda "${LANGDA_WEIGHT:-0}" \
    --patch-size 128 --batch-size 4 --repeat 8 --epochs "${SEED_EPOCHS:-16}" --steps-per-epoch 50 --lr 5e-4 \
    --val-max-images 11 --checkpoint-every 50 --output "$RUNS/seed-real"

# Stage 2b-c: fine-tune that model on the same pairs (--init: fresh AdamW and cosine schedule each
# time). 2b: lr 2e-4 for 900 steps of a 3000-step schedule (stopped there, as the bundled run was);
# 2c: lr 1.5e-4 -> 1e-6 over 900 steps; its best checkpoint on L192 is bundled. (A further 2 x 256^2
# stage at lr 1e-4 stayed at 30.43 dB for 500 steps and was stopped.)
SEED_FT=(--pairs "$CT/mayo2016_pairs" --val-patients L192 --langae "$RUNS/langae-A/last" --preset lite
         --lambda 0 --val-max-images 11 --checkpoint-every 50 --steps-per-epoch 150)
$PY -m training seed "${SEED_FT[@]}" --init "$RUNS/seed-real/best" --output "$RUNS/seed-ft" --seed 1 \
    --patch-size 128 --batch-size 4 --repeat 24 --epochs 20 --lr 2e-4 --stop-at-step 900
$PY -m training seed "${SEED_FT[@]}" --init "$RUNS/seed-ft/last" --output "$RUNS/seed-ft2" --seed 2 \
    --patch-size 128 --batch-size 4 --repeat 24 --epochs 6 --lr 1.5e-4

# Stage 2w: the bundled default, SEED lite with a 60 % wider decoder (--decoder-channels 128 64 48 48,
# 1.91 M trainable parameters, lite's 1.19 M), from scratch on the same pairs like stage 2 (lr 5e-4,
# cosine over 1800 steps, stopped at step 1522: the best checkpoint, step 1500, 30.48 dB), then
# fine-tuned at lr 1.5e-4 -> 1e-6 over 600 steps (best at step 500, 30.54 dB). The lite chain above
# (2a-2c, 30.44 dB, the previous bundle) stays for the comparison row of the table below.
WIDE=(--pairs "$CT/mayo2016_pairs" --val-patients L192 --langae "$RUNS/langae-A/last" --preset lite --lambda 0
      --val-max-images 11 --checkpoint-every 50 --steps-per-epoch 100 --patch-size 128 --batch-size 4 --repeat 24
      --decoder-channels 128 64 48 48)
$PY -m training seed "${WIDE[@]}" --output "$RUNS/seed-wide" --seed 5 --epochs 18 --lr 5e-4 --stop-at-step 1522
$PY -m training seed "${WIDE[@]}" --init "$RUNS/seed-wide/best" --output "$RUNS/seed-wide-ft" --seed 6 \
    --epochs 6 --lr 1.5e-4
# Stage 2y, the bundled default now: stage 2x trained 2500 steps more, twice the batch (8 x 128^2, 20 000
# crops: 2.4x all of 2w + 2x), lr 1.5e-4 -> 1e-6, in bfloat16 on the CPU (--amp bf16; validation in
# float32); validated every 250 steps: 30.51-30.60 dB, best at step 1500 (30.60 dB), last 30.56 dB.
# 69 minutes on 2 cores with AVX512-BF16 (the session's copy of the 2x bundle was its --init).
$PY -m training seed "${WIDE[@]}" --init "$RUNS/seed-wide-ft/best" --output "$RUNS/seed-long" --seed 21 \
    --steps-per-epoch 250 --batch-size 8 --repeat 80 --epochs 10 --lr 1.5e-4 --amp bf16

# The table on L192 (real quarter dose) with the classical baselines tuned on the training patients,
# the previous bundle (2x) beside the bundled one (2y); then the bundled one with --self-ensemble.
$PY -m training evaluate --pairs "$CT/mayo2016_pairs" --val-patients L192 --baselines gaussian,nlm,bm3d \
    --tune-patients L096,L143,L286 --metrics psnr ssim fsim --out "$RUNS/eval-L192-tune"
$PY -m training evaluate --pairs "$CT/mayo2016_pairs" --val-patients L192 --baselines gaussian,nlm,bm3d \
    --tuned "$RUNS/eval-L192-tune/evaluation.json" --weights "SEED wide, 2y=$RUNS/seed-long/best" \
    "SEED wide, 2x=$RUNS/seed-wide-ft/best" --metrics psnr ssim fsim --out "$RUNS/eval-L192"
$PY -m training evaluate --pairs "$CT/mayo2016_pairs" --val-patients L192 --weights "SEED wide=$RUNS/seed-long/best" \
    --self-ensemble --metrics psnr ssim fsim --out "$RUNS/eval-L192-se"
$PY scripts/bundle_weights.py --seed-run "$RUNS/seed-long" \
    --seed-init-run "$RUNS/seed-wide" "$RUNS/seed-wide-ft" --langae-run "$RUNS/langae-Z" \
    --langae-init-run "$RUNS/langae-A" "$RUNS/langae-B" "$RUNS/langae-B2" "$RUNS/langae-W" "$RUNS/langae-R" \
    "$RUNS/langae-R3" "$RUNS/langae-C" "$RUNS/langae-M" "$RUNS/langae-U2" "$RUNS/langae-Y" \
    --evaluation "$RUNS/eval-L192/evaluation.json" "$RUNS/eval-L192-se/evaluation.json" --overwrite

# The sharp-kernel weights (napari_langmamba/weights/sharp): the bundled default (stage 2x, the wider
# decoder) fine-tuned on simulated
# low-dose pairs of every 6th chest training slice (B70f), noise matched to the volume's own noise
# (--sim-match-noise, ramp texture), doses 5-50 %; no validation patient of its kernel exists, so
# the last checkpoint of this fixed schedule is bundled (L192 only logs Mayo quality). Stage S1:
# lr 2e-4, stopped at step 420 of 800; S2: from there, noise scaled by 0.75-1.75 per sample
# (tube-current modulation varies the noise along a scan), lr 2e-4 -> 1e-6 over 600 steps.
# S3: from S2, twice the slices (every 3rd), a 7.5 % dose beside the others, 1500 steps of 8 x 128^2,
# lr 1e-4 -> 1e-6, --amp bf16 (the bundled checkpoint: its last). Tried from S3 and not bundled: S4,
# the noise scaled by 1.0-2.5 (the held-out slices' own noise, measured on their inputs, is 1.9x the
# training slices'), 1250 steps: +0.04 dB at 10 %, -0.006 SSIM at 50 %.
SHARP=(--simulate-from "chest=$RUNS/data/chest_train" --sim-doses 0.05,0.1,0.25,0.5 --sim-slice-step 6
       --sim-filter ramp --sim-match-noise
       --low "$CT/mayo2016_pairs/L192/quarter_3mm_B30" --full "$CT/mayo2016_pairs/L192/full_3mm_B30"
       --low "$CT/mayo2016_pairs/L192/quarter_3mm_D45" --full "$CT/mayo2016_pairs/L192/full_3mm_D45"
       --val-patients L192 --val-max-images 11 --preset lite --steps-per-epoch 100 --patch-size 128 --repeat 8
       --batch-size 4 --checkpoint-every 50 --langae "$RUNS/langae-A/last" --lambda 0 --lr 2e-4
       --decoder-channels 128 64 48 48)
$PY -m training seed "${SHARP[@]}" --init "$RUNS/seed-wide-ft/best" --output "$RUNS/seed-sharp" --seed 12 \
    --epochs 8 --stop-at-step 420
$PY -m training seed "${SHARP[@]}" --init "$RUNS/seed-sharp/last" --output "$RUNS/seed-sharp2" --seed 13 \
    --epochs 6 --noise-scale 0.75 1.75
SHARP3=("${SHARP[@]}" --sim-doses 0.05,0.075,0.1,0.25,0.5 --sim-slice-step 3 --batch-size 8 --repeat 16
        --steps-per-epoch 250 --lr 1e-4 --amp bf16)
$PY -m training seed "${SHARP3[@]}" --init "$RUNS/seed-sharp2/last" --output "$RUNS/seed-sharp3" --seed 14 \
    --epochs 6 --noise-scale 0.75 1.75
$PY -m training evaluate --simulate-from "chest=$RUNS/data/chest_heldout" "chest_train=$RUNS/data/chest_train" \
    --sim-doses 0.1,0.5 --sim-slice-step 6 --sim-filter ramp --sim-match-noise --val-patients chest \
    --tune-patients chest_train --tune-slices 3 \
    --baselines gaussian,nlm,bm3d --metrics psnr ssim --out "$RUNS/eval-chest-tune-matched"
$PY -m training evaluate --simulate-from "chest=$RUNS/data/chest_heldout" --sim-doses 0.1,0.5 --sim-slice-step 3 \
    --sim-filter ramp --sim-match-noise --val-patients chest --baselines gaussian,nlm,bm3d \
    --tuned "$RUNS/eval-chest-tune-matched/evaluation.json" --weights "SEED default=$RUNS/seed-long/best" \
    "SEED sharp=$RUNS/seed-sharp3/last" "SEED sharp, S2=$RUNS/seed-sharp2/last" --metrics psnr ssim fsim \
    --out "$RUNS/eval-chest-matched"
$PY scripts/bundle_weights.py --sharp --seed-run "$RUNS/seed-sharp3" \
    --seed-init-run "$RUNS/seed-wide" "$RUNS/seed-wide-ft" "$RUNS/seed-sharp" "$RUNS/seed-sharp2" \
    --langae-bundle napari_langmamba/weights/default/langae \
    --evaluation "$RUNS/eval-chest-matched/evaluation.json" --overwrite
