#!/usr/bin/env bash
# GPU readiness check: every GPU path of ccl checked and measured in one run (tools/gpu_check.py says what and how).
#
#   tools/gpu_check.sh OUT [--quick | --smoke] [--only NAME,...] [--budget SECONDS]
#
# A thin wrapper, for a machine that may lack the network and the package:
# 1. installs what Python lacks (kornia, webdataset; DALI when its wheel is there) from the checkout's .whl/
#    folder, never from the network: the README's GPU section says how to fill it beforehand;
# 2. makes this checkout's ccl importable: as installed, when the installed one is this checkout; otherwise
#    through a folder of symbolic links put first on PYTHONPATH (nothing is installed for it);
# 3. runs the driver, whose exit status it returns: 0 when no check failed, 1 when one did, 2 on a usage error.
# PYTHON names the interpreter (default: python3 on the PATH).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
if [ $# -lt 1 ] || [[ "$1" == -* ]]; then
    echo "usage: tools/gpu_check.sh OUT [--quick | --smoke] [--only NAME,...] [--budget SECONDS]" >&2
    exit 2
fi
OUT="$1"
shift
mkdir -p "$OUT" || exit 2
OUT="$(cd "$OUT" && pwd -P)"
PY="${PYTHON:-$(command -v python3 || command -v python)}"
if [ -z "$PY" ]; then
    echo "error: no python3 on the PATH (set PYTHON)" >&2
    exit 2
fi

# pip may look nowhere but .whl/: no index, and no find-links, index or constraints from pip's configuration.
export PIP_CONFIG_FILE=/dev/null PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1
unset PIP_FIND_LINKS PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_CONSTRAINT
WHL="$ROOT/.whl"
LOG="$OUT/install.log"
: >"$LOG"
REPORT=()

ensure() {  # ensure MODULE DIST...: import MODULE, or install DIST... (it and its dependencies) from .whl/
    local module="$1"
    shift
    if "$PY" -c "import $module" 2>/dev/null; then
        REPORT+=("$1=present")
    # --no-deps with the dependencies named: pip would otherwise re-resolve the installed torch's own
    # requirements, and fail offline wherever one of them is absent, though torch itself works.
    elif [ -d "$WHL" ] && "$PY" -m pip install --no-index --find-links "$WHL" --no-deps "$@" >>"$LOG" 2>&1 \
            && "$PY" -c "import $module" >>"$LOG" 2>&1; then
        REPORT+=("$1=installed")
        echo "installed $* from .whl/" >&2
    else
        REPORT+=("$1=missing")
        echo "warning: $1 is missing and could not be installed from .whl/ (see $LOG)" >&2
    fi
}
ensure kornia kornia kornia-rs
ensure webdataset webdataset braceexpand pyyaml
# pydantic checks the shard manifest; some GPU images lack it (the first H200 run did).
ensure pydantic pydantic pydantic-core annotated-types typing-inspection typing-extensions
# DALI is optional (its benchmark then says it is absent): installed, with its dependencies, only when its wheel
# was put in .whl/.
for wheel in "$WHL"/nvidia_dali_*.whl; do
    if [ -e "$wheel" ] && ! "$PY" -c "import nvidia.dali" 2>/dev/null; then
        dist="$(basename "$wheel" | cut -d- -f1)"
        if "$PY" -m pip install --no-index --find-links "$WHL" "$dist" >>"$LOG" 2>&1; then
            REPORT+=("$dist=installed")
        else
            REPORT+=("$dist=missing")
        fi
    fi
    break
done

# This checkout's code, whatever may be installed: CCL_GPU_CHECK_SHIM=1 forces the links (the test uses it).
SRC="$("$PY" -c 'import os, ccl.train; print(os.path.realpath(os.path.dirname(ccl.train.__file__)))' 2>/dev/null)"
if [ "${CCL_GPU_CHECK_SHIM:-0}" = 1 ] || [ "$SRC" != "$ROOT/train" ]; then
    "$PY" "$ROOT/tools/gpu_check.py" "$OUT/.shim" --make-shim || exit 2
    export PYTHONPATH="$OUT/.shim${PYTHONPATH:+:$PYTHONPATH}"
    REPORT+=("ccl=links")
else
    REPORT+=("ccl=installed")
fi

export CCL_GPU_CHECK_INSTALL_REPORT="${REPORT[*]}"
exec "$PY" "$ROOT/tools/gpu_check.py" "$OUT" "$@"
