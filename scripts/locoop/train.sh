#!/bin/bash
# LoCoOp few-shot training over seeds 1-3, with the positional arguments of the paper's script.
#
#   bash scripts/locoop/train.sh DATA DATASET CFG CTP NCTX SHOTS CSC LAMBDA TOPK
#   bash scripts/locoop/train.sh /data imagenet vit_b16_ep50 end 16 16 False 0.25 200
#
#   DATA     folder holding imagenet/ (and the OOD sets)     DATASET  configs/datasets/<DATASET>.yaml
#   CFG      configs/trainers/LoCoOp/<CFG>.yaml               CTP      class token position: end|middle|front
#   NCTX     number of context vectors                        SHOTS    images per class (1, 2, 4, 8, 16)
#   CSC      class-specific context: False|True               LAMBDA   OOD-loss weight   TOPK  top-K of the OOD rule
#
# Each seed writes output/<DATASET>/LoCoOp/<CFG>_<SHOTS>shots/nctx<NCTX>_csc<CSC>_ctp<CTP>/seed<SEED>
# (relative to the current folder). A seed whose final checkpoint exists is skipped; an interrupted
# one resumes from its latest checkpoint.
#
# Optional environment variables:
#   PYTHON       interpreter (default: python)           SEEDS        seeds to run (default: "1 2 3")
#   TRAINER      LoCoOp (default) or CoOp                OUTPUT_ROOT  instead of ./output
#   BACKBONE     CLIP name or checkpoint path -> MODEL.BACKBONE.NAME (default: the CFG's, ViT-B/16)
#   EPOCHS       -> OPTIM.MAX_EPOCH (default: the CFG's)
#   EXTRA_OPTS   more "KEY VALUE" config overrides appended as they are (word-split)
set -euo pipefail

if [ "$#" -ne 9 ]; then
    echo "usage: $0 DATA DATASET CFG CTP NCTX SHOTS CSC LAMBDA TOPK" >&2
    echo "  e.g. $0 /data imagenet vit_b16_ep50 end 16 16 False 0.25 200" >&2
    exit 2
fi

DATA=$1
DATASET=$2
CFG=$3
CTP=$4
NCTX=$5
SHOTS=$6
CSC=$7
LAMBDA=$8
TOPK=$9

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
export PYTHONPATH="${REPO}${PYTHONPATH:+:${PYTHONPATH}}"
PY=${PYTHON:-python}
TRAINER=${TRAINER:-LoCoOp}
OUTPUT_ROOT=${OUTPUT_ROOT:-output}

EXTRA=()
if [ -n "${BACKBONE:-}" ]; then EXTRA+=(MODEL.BACKBONE.NAME "${BACKBONE}"); fi
if [ -n "${EPOCHS:-}" ]; then EXTRA+=(OPTIM.MAX_EPOCH "${EPOCHS}"); fi
# shellcheck disable=SC2206  # word-splitting EXTRA_OPTS is the point
if [ -n "${EXTRA_OPTS:-}" ]; then EXTRA+=(${EXTRA_OPTS}); fi

for SEED in ${SEEDS:-1 2 3}; do
    DIR=${OUTPUT_ROOT}/${DATASET}/${TRAINER}/${CFG}_${SHOTS}shots/nctx${NCTX}_csc${CSC}_ctp${CTP}/seed${SEED}
    echo "== seed ${SEED}: ${DIR}"
    "${PY}" -m locoop train \
        --root "${DATA}" \
        --seed "${SEED}" \
        --trainer "${TRAINER}" \
        --dataset-config-file "${REPO}/configs/datasets/${DATASET}.yaml" \
        --config-file "${REPO}/configs/trainers/LoCoOp/${CFG}.yaml" \
        --output-dir "${DIR}" \
        --lambda_value "${LAMBDA}" \
        --topk "${TOPK}" \
        --skip-finished \
        TRAINER.LOCOOP.N_CTX "${NCTX}" \
        TRAINER.LOCOOP.CSC "${CSC}" \
        TRAINER.LOCOOP.CLASS_TOKEN_POSITION "${CTP}" \
        DATASET.NUM_SHOTS "${SHOTS}" \
        ${EXTRA[@]+"${EXTRA[@]}"}
done
