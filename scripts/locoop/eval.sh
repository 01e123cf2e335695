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
# Results go into MODEL_DIR: ood_results.md / .csv / .json, ood_scores.npz, plots/*.png.
# Summarise seeds afterwards with: python -m locoop summarize MODEL_DIR/../seed*
#
# Optional environment variables:
#   PYTHON      interpreter (default: python)        TRAINER  LoCoOp (default), CoOp
#   NCTX, CSC   as trained (default 16, False)       LOAD_EPOCH  checkpoint epoch (default: EPOCHS, else 50;
#                                                                "latest" = the newest checkpoint)
#   BACKBONE    -> MODEL.BACKBONE.NAME               EPOCHS   the run's OPTIM.MAX_EPOCH (sets the default LOAD_EPOCH)
#   EXTRA_OPTS  more "KEY VALUE" config overrides appended as they are (word-split)
set -euo pipefail

if [ "$#" -ne 5 ]; then
    echo "usage: $0 DATA DATASET CFG T MODEL_DIR" >&2
    exit 2
fi

DATA=$1
DATASET=$2
CFG=$3
T=$4
MODEL_DIR=$5
OUTPUT_DIR=$5

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
export PYTHONPATH="${REPO}${PYTHONPATH:+:${PYTHONPATH}}"
PY=${PYTHON:-python}
TRAINER=${TRAINER:-LoCoOp}
NCTX=${NCTX:-16}
CSC=${CSC:-False}
LOAD_EPOCH=${LOAD_EPOCH:-${EPOCHS:-50}}

EPOCH_FLAG=()
if [ "${LOAD_EPOCH}" != "latest" ]; then EPOCH_FLAG=(--load-epoch "${LOAD_EPOCH}"); fi
EXTRA=()
if [ -n "${BACKBONE:-}" ]; then EXTRA+=(MODEL.BACKBONE.NAME "${BACKBONE}"); fi
if [ -n "${EPOCHS:-}" ]; then EXTRA+=(OPTIM.MAX_EPOCH "${EPOCHS}"); fi
# shellcheck disable=SC2206
if [ -n "${EXTRA_OPTS:-}" ]; then EXTRA+=(${EXTRA_OPTS}); fi

"${PY}" -m locoop eval \
    --root "${DATA}" \
    --trainer "${TRAINER}" \
    --dataset-config-file "${REPO}/configs/datasets/${DATASET}.yaml" \
    --config-file "${REPO}/configs/trainers/LoCoOp/${CFG}.yaml" \
    --output-dir "${OUTPUT_DIR}" \
    --model-dir "${MODEL_DIR}" \
    ${EPOCH_FLAG[@]+"${EPOCH_FLAG[@]}"} \
    --T "${T}" \
    TRAINER.LOCOOP.N_CTX "${NCTX}" \
    TRAINER.LOCOOP.CSC "${CSC}" \
    ${EXTRA[@]+"${EXTRA[@]}"}
