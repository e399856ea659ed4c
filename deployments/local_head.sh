#!/usr/bin/env bash
# A single-machine Ray head (loopback only, token auth on) and one RL job (`marl-ray rl`) submitted to it.
#
#   deployments/local_head.sh [CONFIG] [--set KEY=VALUE ...]
#   deployments/local_head.sh deployments/configs/local.yaml --set ppo.steps=5
#   KEEP_HEAD=1 deployments/local_head.sh        # leave the head running afterwards
#
# Run it from the repository root (the job's --working-dir is the current directory, which Ray
# uploads minus .gitignore'd paths such as .venv/ and runs/). Because the head shares this
# machine's disk, relative local paths in the config (model.base, rewards[].path, ...,
# run.out_dir) are turned into absolute ones before submitting: the job itself runs inside
# Ray's copy of the working directory, where runs/ does not exist.
#
# Security defaults: every Ray port (GCS, dashboard/job API, client server, agents) binds to
# 127.0.0.1; RAY_AUTH_MODE=token, with the token from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or
# ~/.ray/auth_token (generated there when none exists).
#
# Environment knobs: PYTHON (default python), RAY_PORT (6379), DASHBOARD_PORT (8265),
# RAY_CLIENT_PORT (10001), DASHBOARD_AGENT_PORT (52365), RAY_TEMP_DIR (/tmp/ray), NUM_CPUS,
# NUM_GPUS, SUBMISSION_ID, KEEP_HEAD=1, HEAD_TIMEOUT (90 s).
set -euo pipefail

CONFIG=${1:-deployments/configs/local.yaml}
if [ $# -gt 0 ]; then shift; fi
PY=${PYTHON:-python}
RAY_PORT=${RAY_PORT:-6379}
DASHBOARD_PORT=${DASHBOARD_PORT:-8265}
RAY_CLIENT_PORT=${RAY_CLIENT_PORT:-10001}
DASHBOARD_AGENT_PORT=${DASHBOARD_AGENT_PORT:-52365}
RAY_TEMP_DIR=${RAY_TEMP_DIR:-/tmp/ray}
HEAD_TIMEOUT=${HEAD_TIMEOUT:-90}
ADDRESS="http://127.0.0.1:${DASHBOARD_PORT}"

export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_AUTH_MODE=token RAY_USAGE_STATS_ENABLED=0
unset RAY_ADDRESS  # the head and the submit client must not join some other cluster

if [ ! -f "$CONFIG" ]; then
    echo "local_head.sh: config $CONFIG not found (run from the repository root, or pass a path)" >&2
    exit 2
fi

# Validate the config here (fails fast, before any Ray process starts) and make its relative
# local paths absolute for the job, which runs in Ray's copy of the working directory.
if ! RESOLVED_TEXT=$("$PY" - "$CONFIG" "$@" <<'EOF'
import os, sys
from marl_ray.config import ConfigError, PPORunConfig, load_config

config, rest = sys.argv[1], sys.argv[2:]
sets = [rest[i + 1] for i in range(len(rest) - 1) if rest[i] == "--set"]
try:
    cfg = load_config(PPORunConfig, config, sets)
except ConfigError as e:
    print(f"local_head.sh: config error: {e}", file=sys.stderr)
    sys.exit(2)

def local(key, path, always=False):
    if path and not os.path.isabs(path) and (always or os.path.exists(path)):
        print("--set")
        print(f"{key}={os.path.abspath(path)}")

local("model.base", cfg.model.base)
local("model.tokenizer", cfg.model.tokenizer)
local("model.reference_adapter", cfg.model.reference_adapter)
for i, r in enumerate(cfg.rewards):
    local(f"rewards[{i}].path", r.path)
for i, p in enumerate(cfg.policies):
    local(f"policies[{i}].init_from", p.init_from)
if cfg.data.prompts != "embedded":
    local("data.prompts", cfg.data.prompts)
local("run.out_dir", cfg.run.out_dir, always=True)
EOF
); then
    echo "local_head.sh: invalid config, nothing started" >&2
    exit 2
fi
RESOLVED=()
while IFS= read -r line; do
    if [ -n "$line" ]; then RESOLVED+=("$line"); fi
done <<<"$RESOLVED_TEXT"

if [ -z "${RAY_AUTH_TOKEN:-}" ] && [ -z "${RAY_AUTH_TOKEN_PATH:-}" ] && [ ! -s "$HOME/.ray/auth_token" ]; then
    ray get-auth-token --generate >/dev/null  # writes ~/.ray/auth_token (mode 600)
fi

mkdir -p "$RAY_TEMP_DIR"
HEAD_LOG=$(mktemp "${TMPDIR:-/tmp}/marl-ray-head.XXXXXX.log")
EXTRA=()
if [ -n "${NUM_CPUS:-}" ]; then EXTRA+=("--num-cpus=$NUM_CPUS"); fi
if [ -n "${NUM_GPUS:-}" ]; then EXTRA+=("--num-gpus=$NUM_GPUS"); fi
# --block keeps `ray start` in the foreground of this background job: SIGTERM to it stops exactly
# this head's processes (unlike `ray stop`, which stops every Ray on the machine).
ray start --head --block --node-ip-address=127.0.0.1 --dashboard-host=127.0.0.1 \
    --port="$RAY_PORT" --dashboard-port="$DASHBOARD_PORT" --ray-client-server-port="$RAY_CLIENT_PORT" \
    --dashboard-agent-listen-port="$DASHBOARD_AGENT_PORT" --temp-dir="$RAY_TEMP_DIR" \
    --disable-usage-stats ${EXTRA[@]+"${EXTRA[@]}"} >"$HEAD_LOG" 2>&1 &
HEAD_PID=$!

cleanup() {
    trap - EXIT INT TERM
    if [ "${KEEP_HEAD:-0}" = "1" ] && kill -0 "$HEAD_PID" 2>/dev/null; then
        echo "local_head.sh: head left running (pid $HEAD_PID, log $HEAD_LOG)."
        echo "  export RAY_ADDRESS=$ADDRESS   # then: ray job submit --working-dir . -- python -m marl_ray rl ..."
        echo "  stop it with: kill $HEAD_PID"
        return
    fi
    if kill -0 "$HEAD_PID" 2>/dev/null; then
        kill -TERM "$HEAD_PID" 2>/dev/null || true
        wait "$HEAD_PID" 2>/dev/null || true
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
echo "local_head.sh: starting a Ray head on 127.0.0.1 (dashboard $ADDRESS, token auth on)"
for _ in $(seq "$HEAD_TIMEOUT"); do
    kill -0 "$HEAD_PID" 2>/dev/null || { echo "local_head.sh: ray start failed:" >&2; tail -n 30 "$HEAD_LOG" >&2; exit 1; }
    if port_open "$DASHBOARD_PORT" && port_open "$DASHBOARD_AGENT_PORT"; then
        READY=1
        break
    fi
    sleep 1
done
[ "${READY:-0}" = "1" ] || { echo "local_head.sh: the head did not come up in ${HEAD_TIMEOUT}s" >&2; tail -n 30 "$HEAD_LOG" >&2; exit 1; }

rc=0
ray job submit --address "$ADDRESS" --working-dir . ${SUBMISSION_ID:+--submission-id "$SUBMISSION_ID"} \
    -- "$PY" -m marl_ray rl --config "$CONFIG" "$@" ${RESOLVED[@]+"${RESOLVED[@]}"} || rc=$?
exit "$rc"
