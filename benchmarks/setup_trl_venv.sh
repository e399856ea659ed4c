#!/usr/bin/env bash
# Creates .venv-trl (git-ignored) with the TRL 0.11.4 peer stack from ../shared/BENCHMARK.md.
# Idempotent: re-running only installs what is missing. Usage: bash benchmarks/setup_trl_venv.sh [VENV]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-$ROOT/.venv-trl}"
PY="${PYTHON:-python3}"
# bitsandbytes: the release the project venv uses (0.50.2, CPU 8-bit/4-bit kernels). No release
# runs under transformers 4.46.3 + peft 0.13.2 on a CPU as shipped; benchmarks/trl_peer.py applies
# three small shims for 8bit/4bit (see its cpu_bnb_shims). BNB_SPEC="" skips bitsandbytes.
BNB_SPEC="${BNB_SPEC-bitsandbytes==0.50.2}"

if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi
# .venv-trl is not in .gitignore: keep git from seeing it without touching tracked files.
[ -f "$VENV/.gitignore" ] || echo '*' > "$VENV/.gitignore"

PKGS=(torch==2.13.0 trl==0.11.4 transformers==4.46.3 peft==0.13.2 accelerate==1.0.1
      'datasets<3' 'numpy<2.3' rich tyro)
[ -n "$BNB_SPEC" ] && PKGS+=("$BNB_SPEC")

# pip checks what is already satisfied; a second run installs nothing.
# (The local index prints a "Location ... is ignored" warning per missing package: filtered.)
"$VENV/bin/python" -m pip install --disable-pip-version-check -q "${PKGS[@]}" 2>&1 \
    | { grep -v "^WARNING: Location 'file://" || true; }
"$VENV/bin/python" - <<'PY'
import importlib
for m in ("torch", "transformers", "trl", "peft", "accelerate", "numpy"):
    print(f"{m} {importlib.import_module(m).__version__}")
try:
    import bitsandbytes as bnb
    print(f"bitsandbytes {bnb.__version__}")
except Exception as e:  # noqa: BLE001
    print(f"bitsandbytes unavailable: {type(e).__name__}: {e}")
PY
