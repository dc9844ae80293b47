#!/usr/bin/env bash
# `make train-gpu`: the most valuable GPU work of the generalization issue in one run, sized
# for about 8 minutes on one H100/H200: vocoded training data (HiFi-GAN on the GPU), the
# leave-one-system-out folds of the shipped recipe at full scale (every training trial, the
# recipe's own epoch count), then the default model itself. Results land under $OUT
# (default runs/gpu): fold scores, the checkpoint, the LOSO report.
#
# Needs a machine where `make install` has run (.venv) and ../shared/corpus beside the
# checkout. Every step is resumable: a run cut short is re-run with the same command.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu}
PY=${PY:-.venv/bin/python}
CORPUS=${CORPUS:-../shared/corpus}
export PYANNOTE_METRICS_ENABLED=false PYTHONUNBUFFERED=1
mkdir -p "$OUT"
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
"$PY" -m models vocode --protocol "$CORPUS/ASVspoof2019_LA_cm_protocols/ASVspoof2019.LA.cm.train.trn.txt" \
    --audio-dir "$CORPUS/ASVspoof2019_LA_train/flac" --out runs/vocoded/train \
    --vocoder hifigan-universal --vocoder hifigan-lj --device cuda --quiet
"$PY" -m bench.generalization train-folds --recipe rawnet2-voc --fold-limit 0 --fold-epochs 12 \
    --device cuda --threads 4 --runs "$OUT/loso" | tee "$OUT/folds.log"
"$PY" -m models train models/configs/rawnet2_tel_voc.yaml --run-dir "$OUT/default" \
    --output "$OUT/default.pt" --device cuda --quiet | tee "$OUT/train.log"
"$PY" -m bench.generalization report --mode full --loso-dir "$OUT/loso" --fold-epochs 12 \
    --fold-limit 0 | tee "$OUT/generalization.md"
