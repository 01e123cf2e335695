#!/bin/bash
# Visualise the regions LoCoOp treats as OOD in one image, with the paper's arguments.
#
#   bash scripts/locoop/demo_visualization.sh DATA DATASET CFG MODEL_DIR IMAGE_PATH LABEL
#   bash scripts/locoop/demo_visualization.sh /data imagenet vit_b16_ep50 \
#       output/imagenet/LoCoOp/vit_b16_ep50_16shots/nctx16_cscFalse_ctpend/seed1 \
#       /data/imagenet/images/train/n01440764/n01440764_10026.JPEG 0
#
# The run's own settings are read from MODEL_DIR (its config.yaml and checkpoints; see
# `python -m locoop run-settings MODEL_DIR`): trainer, backbone, N_CTX, CSC, CTX_INIT, class-token
# position, the top-K it was trained with, and the last epoch with a checkpoint.
# Writes MODEL_DIR/visualization/<IMAGE_PATH relative to DATA>.png (the model's input with the
# OOD regions shaded, at the input resolution) and ..._regions.png (with the local max-softmax map).
#
# Optional environment variables (each overrides what MODEL_DIR records):
#   PYTHON      interpreter (default: the repository's .venv/bin/python, else python3)
#   TRAINER     LoCoOp, CoOp                  BACKBONE  -> MODEL.BACKBONE.NAME
#   NCTX, CSC, CTP, CTX_INIT   N_CTX, CSC, class-token position, CTX_INIT
#   TOPK        K of the OOD rule (default: the run's TRAINER.LOCOOP.TOPK)
#   LOAD_EPOCH  checkpoint epoch (default: the last; "latest": model-best, else the newest)
#   EPOCHS      -> OPTIM.MAX_EPOCH (and the default LOAD_EPOCH)
#   EXTRA_OPTS  more "KEY VALUE" config overrides appended as they are (word-split)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../_common.sh"

check_args 6 6 "$#" "usage: bash $0 DATA DATASET CFG MODEL_DIR IMAGE_PATH LABEL" \
    "  e.g. bash $0 /data imagenet vit_b16_ep50 RUN_DIR /data/imagenet/images/train/n01440764/n01440764_10026.JPEG 0"

DATA=$1
DATASET=$2
CFG=$3
MODEL_DIR=$4
IMAGE_PATH=$5
LABEL=$6

locoop_inputs "${DATA}" "${DATASET}" "${CFG}"
need_file IMAGE_PATH "${IMAGE_PATH}"
need_int LABEL "${LABEL}" 0
LOAD_EPOCH=${LOAD_EPOCH:-${EPOCHS:-}}
run_settings "${MODEL_DIR}"
run_opts
extra_opts
TOPK=${TOPK:-${RUN_TOPK}}
TOPK_FLAG=()
if [ -n "${TOPK}" ]; then TOPK_FLAG=(--topk "${TOPK}"); fi

"${PY}" -m locoop visualize \
    --root "${DATA}" \
    --trainer "${TRAINER}" \
    --dataset-config-file "${DATASET_YAML}" \
    --config-file "${CFG_YAML}" \
    --model-dir "${MODEL_DIR}" \
    ${EPOCH_FLAG[@]+"${EPOCH_FLAG[@]}"} \
    ${TOPK_FLAG[@]+"${TOPK_FLAG[@]}"} \
    --image_path "${IMAGE_PATH}" \
    --label "${LABEL}" \
    ${RUN_OPTS[@]+"${RUN_OPTS[@]}"} \
    ${EXTRA[@]+"${EXTRA[@]}"}
