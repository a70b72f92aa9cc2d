#!/usr/bin/env bash
# The GPU machine's entry (one per `run` call; pack.py prints the calls):
#   bash benchmarks/gpu_train/run.sh stash .gpu_parts/callK          calls 1 … N-1: check and keep this call's part
#   bash benchmarks/gpu_train/run.sh train .gpu_parts/callN [opts]   last call: assemble, verify, train, write $OUT
#   bash benchmarks/gpu_train/run.sh perf                            after train, while warm: the perf suite's GPU rows
# Everything it prints also goes to $OUT/job.log (that folder comes back to the caller).
set -uo pipefail
mode=${1:?usage: run.sh stash|train CALL_FOLDER [job options] | run.sh perf}
export GPU_TRAIN_T0=${GPU_TRAIN_T0:-$(date +%s.%N)}  # the job's deadline counts from here
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
root=${GPU_TRAIN_ROOT:-/root/gpu_train}                # survives into the next call while the machine is warm
export RKIT_HOME=${RKIT_HOME:-$root/rkit-home}         # the dequantised backbone
out=${OUT:?OUT is not set: run this through the device tool, or set OUT}
mkdir -p "$out" "$root"
cd "$(dirname "$0")/../.." || exit 2                   # the repository root: python -m benchmarks… and retrieval_kit
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if [ "$mode" = perf ]; then  # benchmarks/perf's model stages on the GPU (issue 16, GPU rows): run.py perf
  [ -d "$root/stage/site" ] || { echo "gpu_train: error: no assembled bundle in $root/stage: run the train call first" >&2; exit 2; }
  timeout "${PERF_TIMEOUT_S:-150}" "${PYTHON:-python3}" -m benchmarks.gpu_train.run perf --stage "$root/stage" \
    --perf-out "$root/perf" --stages "${PERF_STAGES:-encode,decode,training}" 2>&1 | tee -a "$out/perf.log"
  rc=${PIPESTATUS[0]}
  cp "$root/perf/results/perf-quick.json" "$out/perf-gpu.json" 2>/dev/null
  exit "$rc"
fi
carried=${2:?usage: run.sh stash|train CALL_FOLDER [job options]}
shift 2
extra=()
if [ "$mode" = train ]; then extra=(--stage "$root/stage" --work "$root/work" --out "$out"); fi
"${PYTHON:-python3}" -m benchmarks.gpu_train.run "$mode" --carried "$carried" --parts "$root/parts" "${extra[@]}" "$@" 2>&1 \
  | tee -a "$out/job.log"
