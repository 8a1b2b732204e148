#!/usr/bin/env bash
# Multi-core scaling of mk1 next to the in-process `threads` baseline, interleaved, as JSON
# lines on stdout. Meant for a machine with many cores (the figures in the README came from a
# 16-core Xeon); on 2 cores it still runs, but oversubscribed.
#
#   scripts/scaling.sh [path/to/mk1] > scaling.jsonl
#   cargo run --release --example plot_scaling -- scaling.jsonl docs/scaling.svg
set -euo pipefail
MK1=${1:-target/release/mk1}
DUR=${DUR:-1500ms}
REPS=${REPS:-2}
WORKERS=${WORKERS:-"1 2 4 8 15"}
tag() { sed "s/^{/{\"experiment\":\"$1\",/"; }

nproc >&2
"$MK1" bench kernels --json | tag kernels
for rep in $(seq "$REPS"); do
  for dim in 128 1024; do
    for w in $WORKERS; do
      "$MK1" run --json --quiet --workers "$w" --max-dim "$dim" --duration "$DUR" | tag "workers-mk1"
      "$MK1" bench --json --systems threads --reps 1 --workers "$w" --max-dim "$dim" --duration "$DUR" | tag "workers-threads"
    done
  done
  for p in 1 2 4 8; do
    "$MK1" run --json --quiet --workers 8 --producers "$p" --max-dim 128 --duration "$DUR" | tag "producers"
  done
  for dim in 128 1024; do
    for w in 1 2 4 8; do
      "$MK1" run --json --quiet --workers "$w" --producers "$w" --max-dim "$dim" --duration "$DUR" | tag "matched"
    done
  done
  for b in off auto; do
    "$MK1" run --json --quiet --workers 4 --max-dim 16 --batch "$b" --duration "$DUR" | tag "batch-$b"
  done
done
"$MK1" bench latency --json --round-trips 200000 | tag latency
