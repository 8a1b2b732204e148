#!/usr/bin/env bash
# `mk1 run` of this checkout against an earlier commit, interleaved and repeated: builds the
# baseline in a git worktree (target dir under target/), then alternates 1 s runs of both at each
# max-dim and prints the median (best, worst) of the per-pair ratio new/baseline, and the ratio of
# the fastest run of each (the least disturbed by other tenants of a shared machine).
#
#   scripts/vs_baseline.sh [REV]          (REV=24ff8c6, REPS=5, DIMS="128 1024" by default;
#                                          ARGS="--workers 2" adds flags to both sides' runs)
set -euo pipefail
cd "$(dirname "$0")/.."
REV=${1:-24ff8c6}
REPS=${REPS:-5}
DIMS=${DIMS:-128 1024}
WT=target/baseline-src
if [ ! -d "$WT" ]; then git worktree add -f --detach "$WT" "$REV" >/dev/null; fi
# (An empty [workspace] table keeps an old checkout out of this repository's workspace.)
(cd "$WT" && git checkout -q -f --detach "$REV" \
  && { grep -q '^\[workspace\]' Cargo.toml || printf '\n[workspace]\n' >> Cargo.toml; } \
  && CARGO_TARGET_DIR=../baseline-target cargo build --release -q)
cargo build --release -q
NEW=target/release/mk1
OLD=target/baseline-target/release/mk1
export ARGS=${ARGS:-}
# shellcheck disable=SC2086 # ARGS is a list of flags
rate() { "$1" run --json --quiet --max-dim "$2" --duration 1s $ARGS | python3 -c 'import json,sys; j=json.load(sys.stdin); assert j["verified"], j; print(j["matrices_per_s"])'; }
for d in $DIMS; do
  pairs=()
  for _ in $(seq "$REPS"); do pairs+=("$(rate "$NEW" "$d"):$(rate "$OLD" "$d")"); done
  python3 - "$d" "$REV" "${pairs[@]}" <<'PY'
import os, statistics as st, sys
d, rev, pairs = sys.argv[1], sys.argv[2], [tuple(map(float, p.split(':'))) for p in sys.argv[3:]]
r = [a / b for a, b in pairs]
new, old = [a for a, _ in pairs], [b for _, b in pairs]
print(f"max-dim {d}{(' ' + os.environ['ARGS']) if os.environ.get('ARGS') else ''}: this checkout / {rev} median {st.median(r):.2f}x (best {max(r):.2f}x, worst {min(r):.2f}x); "
      f"medians {st.median(new):,.0f}/s vs {st.median(old):,.0f}/s over {len(r)} pairs; "
      f"fastest runs {max(new):,.0f}/s vs {max(old):,.0f}/s = {max(new) / max(old):.2f}x")
PY
done
