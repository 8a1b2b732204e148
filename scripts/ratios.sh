#!/usr/bin/env bash
# Same-run A/B ratios for the seed improvements, interleaved and repeated (this machine is
# noisy: identical runs differ by several times). Prints median, best and worst of each ratio.
#
#   scripts/ratios.sh [path/to/mk1]      (REPS=5 DUR=1s by default)
set -euo pipefail
MK1=${1:-target/release/mk1}
REPS=${REPS:-5}
DUR=${DUR:-1s}
rate() { "$MK1" run --json --quiet --duration "$DUR" "$@" | python3 -c 'import json,sys; j=json.load(sys.stdin); assert j["verified"], j; print(j["matrices_per_s"])'; }
ab() {
  local name=$1; shift
  local a=() b=()
  local split
  for ((i = 1; i <= $#; i++)); do [ "${!i}" = "--vs" ] && split=$i; done
  local A=("${@:1:split-1}") B=("${@:split+1}")
  local ratios=()
  for _ in $(seq "$REPS"); do
    local x y
    x=$(rate "${A[@]}"); y=$(rate "${B[@]}")
    ratios+=("$(python3 -c "print($x / $y)")")
    a+=("$x"); b+=("$y")
  done
  python3 - "$name" "${ratios[*]}" "${a[*]}" "${b[*]}" <<'PY'
import statistics as st, sys
name, r, a, b = sys.argv[1], *[list(map(float, s.split())) for s in sys.argv[2:]]
print(f"{name}: ratio median {st.median(r):.2f}x (best {max(r):.2f}x, worst {min(r):.2f}x); "
      f"A median {st.median(a):,.0f}/s, B median {st.median(b):,.0f}/s over {len(r)} interleaved pairs")
PY
}
ab "batching at max-dim 16 (auto vs off)" --max-dim 16 --batch auto --vs --max-dim 16 --batch off
ab "2 producers vs 1 at max-dim 128, 1 worker" --max-dim 128 --workers 1 --producers 2 --vs --max-dim 128 --workers 1 --producers 1
ab "avx512/auto kernel vs portable at max-dim 128" --max-dim 128 --kernel auto --vs --max-dim 128 --kernel portable
ab "avx512/auto kernel vs portable at max-dim 1024" --max-dim 1024 --kernel auto --vs --max-dim 1024 --kernel portable
