#!/usr/bin/env bash
# Creates .venv-trl011 (kept out of git by a '*' .gitignore inside it): TRL 0.11.4 with the
# transformers/peft it was released against, for the checkpoint interop test of the TRL drop-in
# (tests/test_trl_interop.py, skipped unless this venv exists).
# The stack is the one benchmarks/setup_trl_venv.sh pins (torch==2.13.0 CPU build as
# scripts/setup.sh installs it, trl==0.11.4, transformers==4.46.3, peft==0.13.2, accelerate==1.0.1);
# this script only names another folder. Idempotent. Usage: bash benchmarks/setup_trl011_venv.sh [VENV]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
exec bash "$ROOT/benchmarks/setup_trl_venv.sh" "${1:-$ROOT/.venv-trl011}"
