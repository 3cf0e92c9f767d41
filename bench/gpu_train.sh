#!/usr/bin/env bash
# One call on a GPU machine (torch with CUDA; no mrcfile, starfile or pydantic needed): trains the default's candidate
# ("all") and the leave-one-dataset-out fold models ("without-<dataset>") side by side from the pack .gpu-pack/, until
# BUDGET_S seconds (default 450) after the Python entry started, and writes <model>.npz (fp16 weights) and log.json
# (loss curves) to $OUT every minute, and train.log (everything printed). Build the pack first, in the checkout the
# device call sends (python bench/gpu_train.py pack), then, with the device tool (docs/gpu-training.md):
#
#   run  command: bash bench/gpu_train.sh   carry: [".gpu-pack"]   timeout_s: 540
#
# and here, with the folder that came back: python bench/gpu_train_import.py <files_at>. Extra arguments go to
# `bench/gpu_train.py train` (e.g. --models all). Exit status: the trainer's (0 trained, 2 no GPU or no pack).
set -u
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python=${PYTHON:-python3}
out=${OUT:-runs/gpu-train}
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | tee "$out/train.log"
"$python" bench/gpu_train.py train --pack .gpu-pack --out "$out" --budget-s "${BUDGET_S:-450}" --device cuda "$@" 2>&1 | tee -a "$out/train.log"
exit "${PIPESTATUS[0]}"
