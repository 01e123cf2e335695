#!/bin/bash
# The smoke demo: generated data + a tiny random-weight CLIP, then train -> eval -> visualise
# through the real CLI. Its numbers say nothing about LoCoOp's accuracy.
#
#   bash scripts/demo.sh [--output DIR] [--epochs N]
#
# PYTHON selects the interpreter (default: python).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="${REPO}${PYTHONPATH:+:${PYTHONPATH}}"
exec "${PYTHON:-python}" -m locoop demo "$@"
