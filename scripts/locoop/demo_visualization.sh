#!/bin/bash
# Visualise the regions LoCoOp treats as OOD in one image, with the paper's arguments.
#
#   bash scripts/locoop/demo_visualization.sh DATA DATASET CFG MODEL_DIR IMAGE_PATH LABEL
#   bash scripts/locoop/demo_visualization.sh /data imagenet vit_b16_ep50 \
#       output/imagenet/LoCoOp/vit_b16_ep50_16shots/nctx16_cscFalse_ctpend/seed1 \
#       /data/imagenet/images/train/n01440764/n01440764_10026.JPEG 0
#
# Writes MODEL_DIR/visualization/<IMAGE_PATH relative to DATA>.png (the model's input with the
# OOD regions shaded, at the input resolution) and ..._regions.png (with the local max-softmax map).
#
# Optional environment variables:
#   PYTHON      interpreter (default: python)        TRAINER  LoCoOp (default), CoOp
#   NCTX, CSC   as trained (default 16, False)       LOAD_EPOCH  checkpoint epoch (default: EPOCHS, else 50;
#                                                                "latest" = the newest checkpoint)
#   TOPK        -> --topk (default: the config's, 200)
#   BACKBONE    -> MODEL.BACKBONE.NAME               EPOCHS   the run's OPTIM.MAX_EPOCH (sets the default LOAD_EPOCH)
#   EXTRA_OPTS  more "KEY VALUE" config overrides appended as they are (word-split)
set -euo pipefail

if [ "$#" -ne 6 ]; then
    echo "usage: $0 DATA DATASET CFG MODEL_DIR IMAGE_PATH LABEL" >&2
    exit 2
fi

DATA=$1
DATASET=$2
CFG=$3
MODEL_DIR=$4
IMAGE_PATH=$5
LABEL=$6

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
export PYTHONPATH="${REPO}${PYTHONPATH:+:${PYTHONPATH}}"
PY=${PYTHON:-python}
TRAINER=${TRAINER:-LoCoOp}
NCTX=${NCTX:-16}
CSC=${CSC:-False}
LOAD_EPOCH=${LOAD_EPOCH:-${EPOCHS:-50}}

FLAGS=()
if [ "${LOAD_EPOCH}" != "latest" ]; then FLAGS+=(--load-epoch "${LOAD_EPOCH}"); fi
if [ -n "${TOPK:-}" ]; then FLAGS+=(--topk "${TOPK}"); fi
EXTRA=()
if [ -n "${BACKBONE:-}" ]; then EXTRA+=(MODEL.BACKBONE.NAME "${BACKBONE}"); fi
if [ -n "${EPOCHS:-}" ]; then EXTRA+=(OPTIM.MAX_EPOCH "${EPOCHS}"); fi
# shellcheck disable=SC2206
if [ -n "${EXTRA_OPTS:-}" ]; then EXTRA+=(${EXTRA_OPTS}); fi

"${PY}" -m locoop visualize \
    --root "${DATA}" \
    --trainer "${TRAINER}" \
    --dataset-config-file "${REPO}/configs/datasets/${DATASET}.yaml" \
    --config-file "${REPO}/configs/trainers/LoCoOp/${CFG}.yaml" \
    --model-dir "${MODEL_DIR}" \
    ${FLAGS[@]+"${FLAGS[@]}"} \
    --image_path "${IMAGE_PATH}" \
    --label "${LABEL}" \
    TRAINER.LOCOOP.N_CTX "${NCTX}" \
    TRAINER.LOCOOP.CSC "${CSC}" \
    ${EXTRA[@]+"${EXTRA[@]}"}
