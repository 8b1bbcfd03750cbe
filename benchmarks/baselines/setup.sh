#!/usr/bin/env bash
# Create the two baseline virtualenvs from scratch (idempotent: an existing venv is reused and
# pip only installs what is missing). Usage (from anywhere):
#     bash benchmarks/baselines/setup.sh            # both
#     bash benchmarks/baselines/setup.sh flowersim  # only Flower simulation
#     bash benchmarks/baselines/setup.sh pfl        # only pfl-research
# Venvs go to <repo>/.bench-venvs/{flowersim,pfl}; rankfed is installed editable into each.
# The project's own .venv is never touched.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENVS="$REPO/.bench-venvs"
PY="${PYTHON:-python3.11}"
TORCH="torch==2.13.0"
which_ones=("${@:-flowersim pfl}")
which_ones=(${which_ones[*]})

mkvenv() {  # $1 = name
  local v="$VENVS/$1"
  if [ ! -x "$v/bin/python" ]; then
    mkdir -p "$VENVS"
    "$PY" -m venv "$v"
  fi
  "$v/bin/python" -m pip install -q --upgrade pip setuptools wheel >/dev/null
}

for name in "${which_ones[@]}"; do
  case "$name" in
    flowersim)
      mkvenv flowersim
      "$VENVS/flowersim/bin/python" -m pip install "$TORCH" "flwr[simulation]==1.41.0"
      "$VENVS/flowersim/bin/python" -m pip install -e "$REPO"
      "$VENVS/flowersim/bin/python" -c "import flwr, ray, torch, rankfed; print('flowersim ok: flwr', flwr.__version__, 'ray', ray.__version__, 'torch', torch.__version__)"
      ;;
    pfl)
      mkvenv pfl
      # pfl's [pytorch] extra; torch pinned to the same build as rankfed's
      "$VENVS/pfl/bin/python" -m pip install "$TORCH" "pfl[pytorch]"
      "$VENVS/pfl/bin/python" -m pip install -e "$REPO"
      "$VENVS/pfl/bin/python" -c "import pfl, torch, rankfed; from importlib.metadata import version; print('pfl ok: pfl', version('pfl'), 'torch', torch.__version__)"
      ;;
    *) echo "unknown venv '$name' (flowersim | pfl)" >&2; exit 2 ;;
  esac
done
