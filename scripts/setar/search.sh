#!/bin/bash
# SeTAR: training-free low-rank search on the ID validation split, then the OOD benchmark (MCM, GL-MCM,
# ID accuracy) of the pruned model.
#
#   bash scripts/setar/search.sh DATA CONFIG OUTPUT [MODEL_DIR] [KEY VALUE ...]
#   bash scripts/setar/search.sh /data configs/setar/imagenet/SeTAR.yaml output/setar/imagenet/SeTAR \
#       DATASET.VAL_SPLIT_FILE imagenet1k_val_data.json
#   bash scripts/setar/search.sh /data configs/setar/imagenet/SeTAR.yaml output/setar/imagenet/LoCoOp+SeTAR \
#       output/imagenet/LoCoOp/vit_b16_ep50_16shots/nctx16_cscFalse_ctpend/seed1 DATASET.VAL_SPLIT_FILE ...
#
#   DATA       folder holding the ID dataset (imagenet/ or ID_VOC/) and the OOD sets
#   CONFIG     a config under configs/setar/ (SeTAR.yaml, Vanilla_MCM.yaml, Vanilla_GL_MCM.yaml, ablations/...)
#   OUTPUT     run folder: search_log.csv/.json, best_settings.json, search_summary.json, ood_results.*, plots/
#   MODEL_DIR  optional: a LoCoOp/CoOp training run whose learned prompts replace the zero-shot prompts
#              (the 4th argument is taken for it unless it looks like a config key FOO.BAR or a --flag);
#              its backbone, N_CTX, CSC, CTX_INIT and class-token position are read from it
#              (`python -m locoop run-settings MODEL_DIR`; BACKBONE, NCTX, CSC, CTX_INIT, CTP override)
#   KEY VALUE  trailing config overrides (e.g. SETAR.MODE naive, DATASET.VAL_SPLIT_FILE FILE)
#
# Optional environment variables:
#   PYTHON      interpreter (default: .venv/bin/python)   SEED  -> --seed (default: the config's, SeTAR's 5)
#   SETTINGS    a best_settings.json to apply instead of searching ('none': the unpruned model)
#   MODE        fast (default) or naive                BACKBONE  -> MODEL.BACKBONE.NAME
#   DEVICE      cpu, cuda, cuda:1 (default automatic)  LOAD_EPOCH  checkpoint epoch of MODEL_DIR (default: best/latest)
#   DATASET_CONFIG  an extra dataset YAML merged before CONFIG (e.g. configs/datasets/imagenet.yaml)
#   NO_TEST=1   stop after the search (no OOD benchmark)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../_common.sh"

check_args 3 "" "$#" "usage: bash $0 DATA CONFIG OUTPUT [MODEL_DIR] [KEY VALUE ...]"

DATA=$1
CONFIG=$2
OUTPUT=$3
shift 3
MODEL_DIR=""
# The 4th argument is the LoCoOp run unless it is a config key (FOO.BAR) or a flag (--...).
if [ "$#" -ge 1 ] && [[ ! "$1" =~ ^[A-Z][A-Z0-9_]*(\.[A-Z0-9_]+)+$ ]] && [[ "$1" != -* ]]; then
    MODEL_DIR=$1
    shift
fi

CONFIG=$(config_file "${CONFIG}")

FLAGS=()
RUN_OPTS=()
if [ -n "${MODEL_DIR}" ]; then
    run_settings "${MODEL_DIR}"
    run_opts
    FLAGS+=(--model-dir "${MODEL_DIR}")
fi
if [ -n "${LOAD_EPOCH:-}" ]; then FLAGS+=(--load-epoch "${LOAD_EPOCH}"); fi
if [ -n "${SETTINGS:-}" ]; then FLAGS+=(--settings "${SETTINGS}"); fi
if [ -n "${MODE:-}" ]; then FLAGS+=(--mode "${MODE}"); fi
if [ -n "${SEED:-}" ]; then FLAGS+=(--seed "${SEED}"); fi
if [ -n "${BACKBONE:-}" ]; then FLAGS+=(--backbone "${BACKBONE}"); fi
if [ -n "${DEVICE:-}" ]; then FLAGS+=(--device "${DEVICE}"); fi
if [ -n "${DATASET_CONFIG:-}" ]; then FLAGS+=(--dataset-config-file "${DATASET_CONFIG}"); fi
if [ "${NO_TEST:-0}" != "0" ]; then FLAGS+=(--no-test); fi

"${PY}" -m locoop setar-search \
    --root "${DATA}" \
    --config-file "${CONFIG}" \
    --output-dir "${OUTPUT}" \
    ${FLAGS[@]+"${FLAGS[@]}"} \
    ${RUN_OPTS[@]+"${RUN_OPTS[@]}"} \
    "$@"
