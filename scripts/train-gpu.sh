#!/usr/bin/env bash
# `make train-gpu`: the most valuable GPU work of the detection issue in one run, sized for
# about 10 minutes on one H100/H200 with 16 CPU cores (each step is resumable: run the script
# again to finish it):
#   1. vocoded training data: the Speech Commands train clips through HiFi-GAN (the first
#      400), vocos-8k and nsf-8k, as `make vocode-extra`, which the `lcnn-sc-voc3` part
#      trains on;
#   2. the leave-one-system-out folds of the default's three LCNN parts (`lcnn`, `lcnn-s1`,
#      `lcnn-sc-voc3`) at full scale, six folds in parallel processes per part: the fold
#      checkpoints the calls estimate needs for the whole default (on the CPU, without them,
#      it falls back to the default's GMM parts);
#   3. the calls estimate in full mode with those folds (`bench.calls --mode full`);
#   4. the LOSO report over every recipe.
# Results land under $OUT (default runs/gpu): fold runs, logs, calls.{json,md}, the LOSO
# report. Bring them back; `python -m bench.generalization export-folds --runs $OUT/loso`
# commits the fold scores.
#
# Needs a machine where `make install` has run (.venv) and ../shared/corpus beside the
# checkout.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu}
PY=${PY:-.venv/bin/python}
SYSTEMS="T01 T02 T03 T04 T05 T06"
export PYANNOTE_METRICS_ENABLED=false PYTHONUNBUFFERED=1
mkdir -p "$OUT/logs"
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
EXTRA=${EXTRA:-../shared/extra-bonafide/speech-commands}
vocode_extra() {  # vocoder, out, extra flags
    "$PY" -m models vocode --protocol "$EXTRA/bonafide.train.txt" --audio-dir "$EXTRA/flac" \
        --vocoder "$1" --out "$2" --device cuda --quiet "${@:3}"
}
vocode_extra hifigan-universal runs/vocoded/sc-train --shard 0/2 --limit 400
vocode_extra vocos-8k runs/vocoded/sc-train-vocos
vocode_extra nsf-8k runs/vocoded/sc-train-nsf

folds() {  # recipe, then extra train-folds flags: one process per held-out engine
    local recipe=$1; shift
    local pids=()
    for system in $SYSTEMS; do
        "$PY" -m bench.generalization train-folds --recipe "$recipe" --systems "$system" \
            --device cuda --threads 2 --runs "$OUT/loso" "$@" \
            > "$OUT/logs/$recipe-$system.log" 2>&1 &
        pids+=($!)
    done
    local failed=0
    for pid in "${pids[@]}"; do wait "$pid" || failed=1; done
    cat "$OUT"/logs/"$recipe"-*.log | grep "EER" || true
    return $failed
}
folds lcnn
folds lcnn-s1
folds lcnn-sc-voc3
"$PY" -m bench.calls --mode full --loso-runs "$OUT/loso" --threads 4 --out "$OUT" \
    | tee "$OUT/calls.log"
"$PY" -m bench.generalization report --mode full --loso-dir "$OUT/loso" | tee "$OUT/generalization.md"
