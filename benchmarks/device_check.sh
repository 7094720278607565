#!/usr/bin/env bash
# GPU device check in one command that fits in 8 minutes on one H200 (see benchmarks/device_check.py for the steps):
#
#   bash benchmarks/device_check.sh                  # on a GPU machine: every step, within 8 minutes
#   bash benchmarks/device_check.sh --dry-run        # anywhere (CPU): the plan, argument parsing, tiny CPU versions
#   bash benchmarks/device_check.sh --json out.json --steps-to-run hash knn   # options of device_check.py
#
# Python: $PYTHON, else .venv/bin/python where the project is installed, else python3 (a GPU machine's image).
# The repository root goes on PYTHONPATH, so the package needs no install there.
#
# A GPU machine that cannot reach a package index (the lent H100/H200 machines) lacks the project's own
# dependencies (terratorch, torchgeo, rasterio, ...). Fetch their wheels here first, with a Python 3.12 environment
# of the project (`make install PY=python3.12 VENV=.venv312`):
#
#   bash benchmarks/device_check.sh --fetch-wheels   # -> .device_wheels/partN/ (each <= 58 MiB, git-ignored)
#
# then carry .device_wheels/partN to the machine, and on it `bash benchmarks/device_check.sh --install-wheels`
# installs whatever .device_wheels holds into $EOPLUGINS_DEVICE_SITE (default /tmp/eoplugins-site; it stays while
# the machine is held, so parts can travel in successive calls); a plain run installs any wheels found there first.
set -uo pipefail
cd "$(dirname "$0")/.."
T0=$SECONDS
WHEELS=.device_wheels
SITE=${EOPLUGINS_DEVICE_SITE:-/tmp/eoplugins-site}
# packages of the project's environment that a device check does not need: tools (ruff), the MLflow client and its
# own dependencies (tests only), and natten (a C++/CUDA extension built against this machine's torch, not the image's)
EXCLUDE="terratorch-eoplugins ruff natten mlflow-skinny databricks-sdk fastapi gitpython gitdb smmap sqlparse starlette
uvicorn cachetools google-auth pyasn1 pyasn1-modules cryptography cffi pycparser python-dotenv python-multipart
opentelemetry-api opentelemetry-proto opentelemetry-sdk opentelemetry-semantic-conventions"

norm() { tr 'A-Z_.' 'a-z--'; }

fetch_wheels() {
    local venv=${WHEEL_VENV:-.venv312} out=${1:-$WHEELS}
    if [ ! -x "$venv/bin/python" ]; then
        echo "device_check.sh --fetch-wheels: $venv/bin/python not found; create a Python 3.12 environment of the" \
             "project first (make install PY=python3.12 VENV=$venv) or name one with WHEEL_VENV" >&2
        return 2
    fi
    if [ -e "$out" ] && [ -n "$(ls -A "$out" 2>/dev/null)" ]; then
        echo "device_check.sh --fetch-wheels: $out is not empty; remove it first (it holds fetched wheels only)" >&2
        return 2
    fi
    mkdir -p "$out/all"
    local image reqs
    image=$(grep -v '^#' benchmarks/device_image_packages.txt | norm | sort -u)
    reqs=$("$venv/bin/python" -m pip freeze --exclude-editable 2>/dev/null | grep '==' | while IFS= read -r line; do
        name=$(printf '%s' "${line%%==*}" | norm)
        if ! grep -qx -- "$name" <<<"$image" && ! tr -s ' \n' '\n' <<<"$EXCLUDE" | grep -qx -- "$name"; then
            printf '%s\n' "$line"
        fi
    done)
    echo "fetching $(wc -l <<<"$reqs") wheels the device image lacks into $out"
    # shellcheck disable=SC2086
    "$venv/bin/python" -m pip wheel -q --no-deps -w "$out/all" $reqs 2>&1 | grep -v '^WARNING: Location' || true
    # first-fit decreasing into parts of at most 58 MiB (a device call carries 64 MiB with the working tree)
    "$venv/bin/python" - "$out" <<'PY'
import shutil, sys
from pathlib import Path
out, cap = Path(sys.argv[1]), 58 * 2**20
parts: list[int] = []
for whl in sorted((out / "all").glob("*.whl"), key=lambda p: -p.stat().st_size):
    size = whl.stat().st_size
    i = next((i for i, used in enumerate(parts) if used + size <= cap), len(parts))
    if i == len(parts):
        parts.append(0)
    parts[i] += size
    (out / f"part{i + 1}").mkdir(exist_ok=True)
    shutil.move(str(whl), out / f"part{i + 1}" / whl.name)
(out / "all").rmdir()
PY
    du -sh "$out"/part* | sed 's/^/  /'
    echo "carry each $out/partN (one or more per device call) and run: bash benchmarks/device_check.sh --install-wheels"
}

install_wheels() {
    local src=${1:-$WHEELS} py=$2 todo=() w
    [ -d "$src" ] || return 0
    while IFS= read -r w; do
        [ -e "$SITE/.installed/$(basename "$w")" ] || todo+=("$w")
    done < <(find "$src" -name '*.whl' | sort)
    [ ${#todo[@]} -eq 0 ] && return 0
    echo "installing ${#todo[@]} carried wheels into $SITE"
    mkdir -p "$SITE/.installed"
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${todo[@]}" \
        2>&1 | grep -v '^WARNING: Location\|WARNING: Target directory' || true
    for w in "${todo[@]}"; do touch "$SITE/.installed/$(basename "$w")"; done
}

if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -x .venv/bin/python ] && .venv/bin/python -c 'import importlib.util as u, sys; sys.exit(not u.find_spec("terratorch"))' \
    2>/dev/null; then PY=.venv/bin/python
else PY=$(command -v python3)
fi

case "${1:-}" in
    --fetch-wheels) fetch_wheels "${2:-}"; exit $? ;;
    --install-wheels) install_wheels "${2:-$WHEELS}" "$PY"; exit $? ;;
esac

install_wheels "$WHEELS" "$PY"
[ -d "$SITE" ] && export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
# 8 minutes in all: what the set-up took comes off the Python part's budget (unless --budget-s is given)
BUDGET=()
case " $* " in *" --budget-s "*) ;; *) BUDGET=(--budget-s $((465 - (SECONDS - T0)))) ;; esac
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
exec "$PY" benchmarks/device_check.py "${BUDGET[@]}" "$@"
