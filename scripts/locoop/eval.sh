#!/bin/bash
# OOD benchmark (MCM, GL-MCM and the other scores) of a trained run, with the paper's arguments.
#
#   bash scripts/locoop/eval.sh DATA DATASET CFG T MODEL_DIR
#   bash scripts/locoop/eval.sh /data imagenet vit_b16_ep50 1 \
#       output/imagenet/LoCoOp/vit_b16_ep50_16shots/nctx16_cscFalse_ctpend/seed1
#
#   DATA  folder holding imagenet/, iNaturalist/, SUN/, Places/, Texture/   DATASET  configs/datasets/<DATASET>.yaml
#   CFG   configs/trainers/LoCoOp/<CFG>.yaml    T  softmax temperature     MODEL_DIR  the training run's folder
#
# The run's own settings are read from MODEL_DIR (its config.yaml and checkpoints; see
# `python -m locoop run-settings MODEL_DIR`): trainer, backbone, N_CTX, CSC, CTX_INIT, class-token
# position, and the last epoch with a checkpoint.
# Results go into MODEL_DIR: ood_results.md / .csv / .json, ood_scores.npz, plots/*.png.
# Summarise seeds afterwards with: python -m locoop summarize MODEL_DIR/../seed*
#
# Optional environment variables (each overrides what MODEL_DIR records):
#   PYTHON      interpreter (default: the repository's .venv/bin/python, else python3)
#   TRAINER     LoCoOp, CoOp                  BACKBONE  -> MODEL.BACKBONE.NAME
#   NCTX, CSC, CTP, CTX_INIT   N_CTX, CSC, class-token position, CTX_INIT
#   LOAD_EPOCH  checkpoint epoch (default: the last; "latest": model-best, else the newest)
#   EPOCHS      -> OPTIM.MAX_EPOCH (and the default LOAD_EPOCH)
#   EXTRA_OPTS  more "KEY VALUE" config overrides appended as they are (word-split)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../_common.sh"

check_args 5 5 "$#" "usage: bash $0 DATA DATASET CFG T MODEL_DIR" \
    "  e.g. bash $0 /data imagenet vit_b16_ep50 1 output/imagenet/LoCoOp/vit_b16_ep50_16shots/nctx16_cscFalse_ctpend/seed1"

DATA=$1
DATASET=$2
CFG=$3
T=$4
MODEL_DIR=$5

locoop_inputs "${DATA}" "${DATASET}" "${CFG}"
need_number T "${T}"
LOAD_EPOCH=${LOAD_EPOCH:-${EPOCHS:-}}
run_settings "${MODEL_DIR}"
run_opts
extra_opts

"${PY}" -m locoop eval \
    --root "${DATA}" \
    --trainer "${TRAINER}" \
    --dataset-config-file "${DATASET_YAML}" \
    --config-file "${CFG_YAML}" \
    --output-dir "${MODEL_DIR}" \
    --model-dir "${MODEL_DIR}" \
    ${EPOCH_FLAG[@]+"${EPOCH_FLAG[@]}"} \
    --T "${T}" \
    ${RUN_OPTS[@]+"${RUN_OPTS[@]}"} \
    ${EXTRA[@]+"${EXTRA[@]}"}
