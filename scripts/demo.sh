#!/bin/bash
# The smoke demo: generated data + a tiny random-weight CLIP, then train -> eval -> visualise
# through the real CLI. Its numbers say nothing about LoCoOp's accuracy.
#
#   bash scripts/demo.sh [--output DIR] [--epochs N]
#
# PYTHON selects the interpreter (default: the repository's .venv/bin/python, else python3).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
exec "${PY}" -m locoop demo "$@"
