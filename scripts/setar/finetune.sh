#!/bin/bash
# SeTAR+FT (or the LoRA baseline): fine-tune low-rank adapters with the LoCoOp loss, then the OOD
# benchmark (MCM, GL-MCM, ID accuracy) of the fine-tuned model.
#
#   bash scripts/setar/finetune.sh DATA CONFIG OUTPUT [SETTINGS] [KEY VALUE ...]
#   bash scripts/setar/finetune.sh /data configs/setar/finetune/imagenet/SeTAR+FT.yaml \
#       output/setar/imagenet/SeTAR+FT output/setar/imagenet/SeTAR/best_settings.json \
#       DATASET.VAL_SPLIT_FILE imagenet1k_val_data.json
#   bash scripts/setar/finetune.sh /data configs/setar/finetune/imagenet/LoRA.yaml output/setar/imagenet/LoRA \
#       DATASET.VAL_SPLIT_FILE imagenet1k_val_data.json
#
#   DATA      folder holding the ID dataset (imagenet/ or ID_VOC/) and the OOD sets
#   CONFIG    configs/setar/finetune/{imagenet,voc}/{SeTAR+FT,LoRA}.yaml
#   OUTPUT    run folder: log.txt, config.yaml, run_info.json, adapters/model.pth.tar-<epoch>,
#             finetune_settings.json (SeTAR+FT), ood_results.*, ood_scores.npz, plots/
#             (started again, the run resumes from its latest checkpoint)
#   SETTINGS  the best_settings.json of a SeTAR search (scripts/setar/search.sh); needed by SeTAR+FT,
#             not by LoRA. The 4th argument is taken for it when it is an existing file or when an
#             odd number of arguments follows OUTPUT.
#   KEY VALUE trailing config overrides (e.g. DATASET.VAL_SPLIT_FILE FILE, OPTIM.MAX_EPOCH 5)
#
# Optional environment variables:
#   PYTHON    interpreter (default: .venv/bin/python)  SEED  -> --seed (default: the config's, SeTAR's 5)
#   BACKBONE  -> MODEL.BACKBONE.NAME                DEVICE    cpu, cuda, cuda:1 (default automatic)
#   NO_TEST   1: stop after training (no benchmark)
#   MODEL_DIR a finished run folder: test it without training (results in OUTPUT; SETTINGS optional)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../_common.sh"

check_args 3 "" "$#" "usage: bash $0 DATA CONFIG OUTPUT [SETTINGS] [KEY VALUE ...]"

DATA=$1
CONFIG=$2
OUTPUT=$3
shift 3
SETTINGS=""
# A 4th argument that is a file (or an odd count of remaining arguments) is the settings JSON.
if [ "$#" -ge 1 ] && { [ -f "$1" ] || [ $(( $# % 2 )) -eq 1 ]; }; then
    SETTINGS=$1
    shift
fi

CONFIG=$(config_file "${CONFIG}")

FLAGS=()
if [ -n "${SETTINGS}" ]; then FLAGS+=(--settings "${SETTINGS}"); fi
if [ -n "${SEED:-}" ]; then FLAGS+=(--seed "${SEED}"); fi
if [ -n "${BACKBONE:-}" ]; then FLAGS+=(--backbone "${BACKBONE}"); fi
if [ -n "${DEVICE:-}" ]; then FLAGS+=(--device "${DEVICE}"); fi
if [ "${NO_TEST:-0}" = "1" ]; then FLAGS+=(--no-test); fi
if [ -n "${MODEL_DIR:-}" ]; then FLAGS+=(--model-dir "${MODEL_DIR}"); fi

"${PY}" -m locoop setar-finetune \
    --root "${DATA}" \
    --config-file "${CONFIG}" \
    --output-dir "${OUTPUT}" \
    ${FLAGS[@]+"${FLAGS[@]}"} \
    "$@"
