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
#   PYTHON       interpreter (default: .venv/bin/python)  SEEDS        seeds to run (default: "1 2 3")
#   TRAINER      LoCoOp (default) or CoOp                OUTPUT_ROOT  instead of ./output
#   BACKBONE     CLIP name or checkpoint path -> MODEL.BACKBONE.NAME (default: the CFG's, ViT-B/16)
#   EPOCHS       -> OPTIM.MAX_EPOCH (default: the CFG's)
#   EXTRA_OPTS   more "KEY VALUE" config overrides appended as they are (word-split)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../_common.sh"

check_args 9 9 "$#" "usage: bash $0 DATA DATASET CFG CTP NCTX SHOTS CSC LAMBDA TOPK" \
    "  e.g. bash $0 /data imagenet vit_b16_ep50 end 16 16 False 0.25 200"

DATA=$1
DATASET=$2
CFG=$3
CTP=$4
NCTX=$5
SHOTS=$6
CSC=$7
LAMBDA=$8
TOPK=$9

locoop_inputs "${DATA}" "${DATASET}" "${CFG}"
case "${CTP}" in end|middle|front) ;; *) die "CTP must be end, middle or front, got '${CTP}'" ;; esac
need_int NCTX "${NCTX}" 1
need_int SHOTS "${SHOTS}"
case "${CSC}" in True|False) ;; *) die "CSC must be True or False, got '${CSC}'" ;; esac
need_number LAMBDA "${LAMBDA}"
need_int TOPK "${TOPK}" 1
TRAINER=${TRAINER:-LoCoOp}
OUTPUT_ROOT=${OUTPUT_ROOT:-output}

extra_opts
if [ -n "${BACKBONE:-}" ]; then EXTRA=(MODEL.BACKBONE.NAME "${BACKBONE}" ${EXTRA[@]+"${EXTRA[@]}"}); fi

for SEED in ${SEEDS:-1 2 3}; do
    DIR=${OUTPUT_ROOT}/${DATASET}/${TRAINER}/${CFG}_${SHOTS}shots/nctx${NCTX}_csc${CSC}_ctp${CTP}/seed${SEED}
    echo "== seed ${SEED}: ${DIR}"
    "${PY}" -m locoop train \
        --root "${DATA}" \
        --seed "${SEED}" \
        --trainer "${TRAINER}" \
        --dataset-config-file "${DATASET_YAML}" \
        --config-file "${CFG_YAML}" \
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
