# Shared preamble of the scripts under scripts/ (sourced, never run on its own).
#
# After `source scripts/_common.sh`:
#   REPO        the repository root (PYTHONPATH starts with it, so a clone works without installing)
#   PY          the interpreter: $PYTHON if set, else REPO/.venv/bin/python (what `make install` creates)
#               if it exists, else python3, else python. One line on stderr says which, unless it is
#               the repository's .venv; a Python without the project's packages stops here with the fix.
#   SCRIPT      the calling script's name, for messages
# and the checks below, each one message naming the script's own argument and exit status 2.

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SCRIPT="$(basename "$0")"
export PYTHONPATH="${REPO}${PYTHONPATH:+:${PYTHONPATH}}"

# die MESSAGE...: one line on stderr, exit status 2 (bad input, nothing started).
die() {
    echo "${SCRIPT}: error: $*" >&2
    exit 2
}

# check_args MIN MAX COUNT USAGE_LINE...: print the usage and exit 2 unless MIN <= COUNT <= MAX
# (MAX empty: no upper limit).
check_args() {
    local min=$1 max=$2 count=$3
    shift 3
    if [ "${count}" -lt "${min}" ] || { [ -n "${max}" ] && [ "${count}" -gt "${max}" ]; }; then
        printf '%s\n' "$@" >&2
        exit 2
    fi
}

_pick_python() {
    local venv="${REPO}/.venv/bin/python" why
    if [ -n "${PYTHON:-}" ]; then
        PY=${PYTHON}
        command -v "${PY}" >/dev/null 2>&1 || die "PYTHON=${PY} is not an executable; unset it to use ${venv} (else python3)"
        why="PYTHON"
    elif [ -x "${venv}" ]; then
        PY=${venv}
        why="venv"
    elif command -v python3 >/dev/null 2>&1; then
        PY=python3
        why="no ${venv}"
    elif command -v python >/dev/null 2>&1; then
        PY=python
        why="no ${venv}"
    else
        die "no Python found: run 'make install' in ${REPO} (creates .venv, which the scripts then use) or set PYTHON"
    fi
    if [ "$(command -v "${PY}")" = "${venv}" ]; then
        why="venv"
    else
        echo "${SCRIPT}: using $(command -v "${PY}") (${why})" >&2
    fi
    # find_spec imports nothing: this costs milliseconds, and a missing package is reported before a model
    # loads. Only a well-formed answer ("missing: NAMES") counts: a stand-in for python is not second-guessed.
    local answer missing
    answer=$("${PY}" -c "import importlib.util as u; print('missing' + ':', *(n for n in ('yacs', 'torch', 'torchvision') if u.find_spec(n) is None))" 2>/dev/null) \
        || die "${PY} does not run; set PYTHON to a Python >= 3.9 or run 'make install' in ${REPO}"
    missing=$(printf '%s\n' "${answer}" | sed -n 's/^missing: *//p')
    if [ -n "${missing}" ]; then
        local fix="run 'make install' in ${REPO} (creates .venv, which the scripts then use)"
        if [ "${why}" = "venv" ]; then
            fix="the installation into ${REPO}/.venv is incomplete: run 'make install' there again"
        elif [ "${why}" = "PYTHON" ]; then
            if [ -x "${venv}" ]; then fix="unset PYTHON to use ${venv}"; else fix="set PYTHON to a Python that has them, or ${fix}"; fi
        fi
        die "${PY} lacks the project's packages (${missing}): ${fix}; or install them into this Python:" \
            "pip install -r requirements.txt && pip install -e ."
    fi
}
_pick_python

# need_dir NAME PATH: PATH must be an existing folder.
need_dir() {
    [ -d "$2" ] || die "$1 $2 is not a folder"
}

# need_file NAME PATH: PATH must be an existing file.
need_file() {
    [ -f "$2" ] || die "$1 $2 is not a file"
}

# need_number NAME VALUE: VALUE must be a number (integer or decimal).
need_number() {
    [[ "$2" =~ ^[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?$ ]] || die "$1 must be a number, got '$2'"
}

# need_int NAME VALUE [MIN]: VALUE must be an integer (>= MIN when given).
need_int() {
    [[ "$2" =~ ^[+-]?[0-9]+$ ]] || die "$1 must be an integer, got '$2'"
    if [ -n "${3:-}" ] && [ "$2" -lt "$3" ]; then die "$1 must be >= $3, got $2"; fi
}

# repo_config NAME DIR STEM: print DIR/STEM.yaml under the repository, or stop listing the choices.
repo_config() {
    local name=$1 dir=$2 stem=$3 f
    if [ -f "${REPO}/${dir}/${stem}.yaml" ]; then
        echo "${REPO}/${dir}/${stem}.yaml"
        return
    fi
    local choices=()
    for f in "${REPO}/${dir}"/*.yaml; do [ -f "$f" ] && choices+=("$(basename "$f" .yaml)"); done
    die "${name} '${stem}': no ${dir}/${stem}.yaml; choose one of: ${choices[*]:-(none)}"
}

# locoop_inputs DATA DATASET CFG: check the LoCoOp scripts' first three arguments and set
# DATASET_YAML (configs/datasets/<DATASET>.yaml) and CFG_YAML (configs/trainers/LoCoOp/<CFG>.yaml).
locoop_inputs() {
    need_dir DATA "$1"
    DATASET_YAML=$(repo_config DATASET configs/datasets "$2")
    CFG_YAML=$(repo_config CFG configs/trainers/LoCoOp "$3")
}

# config_file PATH: PATH as given if it is a file, else relative to the repository when that exists
# (a missing file is left for the command to report).
config_file() {
    if [ ! -f "$1" ] && [ -f "${REPO}/$1" ]; then echo "${REPO}/$1"; else echo "$1"; fi
}

# run_settings MODEL_DIR: the settings a training run folder was trained with, as RUN_* variables
# (python -m locoop run-settings; it checks the folder and LOAD_EPOCH and explains any problem).
run_settings() {
    local out
    out=$("${PY}" -m locoop run-settings "$1" --shell --prog "${SCRIPT}" ${LOAD_EPOCH:+--load-epoch "${LOAD_EPOCH}"}) \
        || exit $?
    eval "${out}"
}

# run_opts: after run_settings, set TRAINER and the array RUN_OPTS (config overrides) to the run's
# settings, each overridden by the environment variable of the same name when that is set:
# TRAINER, BACKBONE, NCTX, CSC, CTX_INIT, CTP. Settings the folder does not record are left to the
# method YAML. Sets EPOCH_FLAG to --load-epoch RUN_LOAD_EPOCH (none: the trainer's own choice).
run_opts() {
    TRAINER=${TRAINER:-${RUN_TRAINER:-LoCoOp}}
    RUN_OPTS=()
    local pair key value
    for pair in "MODEL.BACKBONE.NAME=${BACKBONE:-${RUN_BACKBONE}}" "TRAINER.LOCOOP.N_CTX=${NCTX:-${RUN_NCTX}}" \
                "TRAINER.LOCOOP.CSC=${CSC:-${RUN_CSC}}" "TRAINER.LOCOOP.CLASS_TOKEN_POSITION=${CTP:-${RUN_CTP}}"; do
        key=${pair%%=*}
        value=${pair#*=}
        if [ -n "${value}" ]; then RUN_OPTS+=("${key}" "${value}"); fi
    done
    # An empty CTX_INIT is a value too (random initialisation): pass it whenever it is known.
    if [ -n "${CTX_INIT+set}" ]; then
        RUN_OPTS+=(TRAINER.LOCOOP.CTX_INIT "${CTX_INIT}")
    elif [ -n "${RUN_NCTX}" ]; then
        RUN_OPTS+=(TRAINER.LOCOOP.CTX_INIT "${RUN_CTX_INIT}")
    fi
    EPOCH_FLAG=()
    if [ -n "${RUN_LOAD_EPOCH}" ]; then EPOCH_FLAG=(--load-epoch "${RUN_LOAD_EPOCH}"); fi
}

# extra_opts: the array EXTRA of config overrides from EPOCHS and EXTRA_OPTS (word-split on purpose).
extra_opts() {
    EXTRA=()
    if [ -n "${EPOCHS:-}" ]; then EXTRA+=(OPTIM.MAX_EPOCH "${EPOCHS}"); fi
    # shellcheck disable=SC2206
    if [ -n "${EXTRA_OPTS:-}" ]; then EXTRA+=(${EXTRA_OPTS}); fi
}
