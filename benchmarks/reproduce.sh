#!/usr/bin/env bash
# Reproduce the benchmark tables of benchmarks/README.md, one command each:
#
#   benchmarks/reproduce.sh cacm        # BEIR-format CACM, every default method through the product path
#   benchmarks/reproduce.sh advbench    # AdvBench-IR with the CACM distractors, every default method
#   benchmarks/reproduce.sh bright DIR  # BRIGHT, 12 domains; DIR = local copy of HF xlangai/BRIGHT (omit when online)
#   benchmarks/reproduce.sh mteb        # the offline local CACM task through mteb
#   benchmarks/reproduce.sh all
#
# Extra arguments after the target go to `rkit bench` (e.g. --adapter runs/my-adapter --device cuda --limit 5).
# Results land in benchmarks/results/<bench>/<date>-<config>.{json,md,png}; caches in $RKIT_HOME/bench.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA="${RKIT_DATA:-/work/shared/data}"
OUT=benchmarks/results
target="${1:-all}"
shift || true

cacm()     { rkit bench beir "$DATA/cacm" --out "$OUT" "$@"; }
advbench() { rkit bench advbench-ir --distractors cacm --out "$OUT" "$@"; }
bright() {
  if [[ $# -gt 0 && -d "$1" ]]; then dir="$1"; shift; rkit bench bright --domain all --data-dir "$dir" --out "$OUT" "$@"
  else rkit bench bright --domain all --out "$OUT" "$@"; fi
}
mteb()     { rkit bench mteb --task cacm --out "$OUT" "$@"; }

case "$target" in
  cacm|advbench|bright|mteb) "$target" "$@" ;;
  all) cacm "$@"; advbench "$@"; mteb "$@" ;;  # BRIGHT needs its documents: run it on its own
  *) echo "usage: $0 cacm|advbench|bright [DIR]|mteb|all [rkit bench options]" >&2; exit 2 ;;
esac
