#!/usr/bin/env bash
# GPU check: on a machine with CUDA, run a short `rollstream up` with the policy on the GPU in
# bfloat16 and print generation tokens/s and learner step time from the lake. If sglang is
# installed, a second run generates through an sglang server (engine = "sglang", weights reloaded
# from the shared disk through /update_weights_from_disk).
#
#   bash ops/gpu_check.sh [SECONDS] [POLICY_DIR]
#
# SECONDS: length of each run (default 180). POLICY_DIR: a Hugging Face checkpoint to serve and
# train (default: the embedded tiny policy). Needs the project's venv (`bash bootstrap.sh`) with a
# CUDA build of torch; sglang from `pip install 'rollstream[sglang]'`.
# NOT RUN HERE: written on a machine without a GPU. The keys it sets are documented in README.md.
set -euo pipefail

cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
PY="$VENV/bin/python"
SECONDS_PER_RUN="${1:-180}"
POLICY="${2:-}"
STATE="$(mktemp -d /tmp/rollstream-gpu-XXXXXX)"

if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check: torch sees no CUDA device (torch.cuda.is_available() is False); nothing to check." >&2
    exit 2
fi
"$PY" -c 'import torch; print("gpu_check: torch", torch.__version__, "on", torch.cuda.get_device_name(0))'

COMMON=(
    --set "state_dir=\"$STATE\""
    --set "policy.device=\"cuda\""
    --set "policy.dtype=\"bfloat16\""
    --set "learner.warm_start_steps=0"
    --set "learner.batch_size=8"
    --set "rollout.concurrency=16"
    --set "torch_threads=0"
)
if [[ -n "$POLICY" ]]; then
    COMMON+=(--set "policy.path=\"$POLICY\"")
fi

figures() {  # $1: run name
    "$VENV/bin/rollstream" query --set "state_dir=\"$STATE\"" \
        "SELECT '$1' AS run,
                sum(num_action_tokens) / (max(finished_at) - min(started_at)) AS gen_tokens_per_s,
                count(*) AS trajectories, count(DISTINCT policy_version) AS versions
         FROM trajectories WHERE run = '$1' AND source = 'online'"
    "$VENV/bin/rollstream" query --set "state_dir=\"$STATE\"" \
        "SELECT '$1' AS run, count(*) AS steps,
                (max(time) - min(time)) / greatest(count(*) - 1, 1) AS seconds_per_step
         FROM train_steps WHERE run = '$1'"
}

echo "gpu_check: run 1, engine = torch on cuda (bf16), ${SECONDS_PER_RUN}s, state $STATE"
"$VENV/bin/rollstream" up --quiet --duration "$SECONDS_PER_RUN" "${COMMON[@]}" --set "run=gpu_torch"
figures gpu_torch

if "$PY" -c 'import sglang' 2>/dev/null; then
    PORT="${SGLANG_PORT:-30000}"
    MODEL="${POLICY:-$STATE/policy/base}"
    echo "gpu_check: run 2, engine = sglang (server on port $PORT, model $MODEL)"
    "$PY" -m sglang.launch_server --model-path "$MODEL" --port "$PORT" --dtype bfloat16 \
        >"$STATE/sglang.log" 2>&1 &
    SGLANG_PID=$!
    trap 'kill "$SGLANG_PID" 2>/dev/null || true' EXIT
    for _ in $(seq 1 120); do
        curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break
        sleep 2
    done
    "$VENV/bin/rollstream" up --quiet --duration "$SECONDS_PER_RUN" "${COMMON[@]}" --set "run=gpu_sglang" \
        --set 'rollout.engine="sglang"' --set "rollout.sglang_url=\"http://127.0.0.1:$PORT\"" \
        --set "rollout.weights_dir=\"$STATE/weights/gpu_sglang\""
    figures gpu_sglang
else
    echo "gpu_check: sglang is not installed (pip install 'rollstream[sglang]'); skipped the sglang run."
fi
echo "gpu_check: done; logs under $STATE/logs"
