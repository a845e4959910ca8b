#!/usr/bin/env bash
# The load benchmark of issue 7: csgd end to end over HTTP against the raw ONNX Runtime limit,
# measured in one run on one machine, for the shipped Fashion-MNIST model (tiny: the daemon's
# own overhead shows) and a ResNet-18 at 128×128 (compute-bound; random weights from the
# official-format fixture, exported and calibrated on synthetic images here, nothing committed).
#
#   benches/load.sh            # full run (~11 min on 2 idle cores)
#   QUICK=1 benches/load.sh    # shorter measurements, for checking the script
#
# Writes benches/results/cpu-latest.{json,md} and prints the table; then what detection adds to a
# logits-only forward pass, in-process (forward-cost), into benches/results/forward-cost-*.json. Everything runs under
# `nice -n 19` (NICE= to change) so that it does not starve other jobs; on a shared machine
# the absolute figures suffer, the ratios much less (they are measured in interleaved rounds).
# Environment: RESNET_PT (the checkpoint), ORT_DYLIB_PATH, CSGD_BENCH_DIR (scratch folder).
set -euo pipefail
cd "$(dirname "$0")/.."

NICE=${NICE-nice -n 19}
WORK=${CSGD_BENCH_DIR:-target/bench-load}
RESNET_PT=${RESNET_PT:-/work/shared/fixtures/resnet18-csg-official.pt}
ORT=${ORT_DYLIB_PATH:-.ort/libonnxruntime.so}
OUT=${CSGD_BENCH_OUT:-benches/results}
if [[ -n ${QUICK:-} ]]; then
  TINY=(--rounds 2 --secs 2 --latency-secs 4 --cost-pairs 2 --cost-secs 1)
  BIG=(--rounds 2 --secs 4 --latency-secs 6 --batches 1,4,8 --cost-pairs 2 --cost-secs 2)
  TINY_FWD=(--rounds 3 --calls 5)
  BIG_FWD=(--batch 8 --rounds 3 --calls 1)
else
  TINY=(--rounds 3 --secs 5 --latency-secs 10)
  BIG=(--rounds 3 --secs 10 --latency-secs 20 --batches 1,2,4,8,16 --cost-secs 6)
  TINY_FWD=(--rounds 15 --calls 20)
  BIG_FWD=(--batch 8 --rounds 9 --calls 3)
fi
mkdir -p "$WORK" "$OUT"
echo "load before: $(uptime)"

$NICE cargo build --release -p csgd --bin csgd
$NICE cargo build --release -p csg-export --bin csg-export
LOAD=($NICE cargo bench -p csgd --bench load --)

RESNET=$WORK/resnet18-128.onnx
if [[ ! -f $RESNET ]]; then
  $NICE target/release/csg-export export "$RESNET_PT" -o "$RESNET.tmp" --name resnet18-128 --input-size 128
  # Random weights predict one class for nearly everything, so `csgd calibrate` cannot fit
  # it; the stand-in runs the real fitting code on synthetic outputs (see benches/load).
  "${LOAD[@]}" stand-in-calibration "$RESNET.tmp" --ort-library "$ORT"
  mv "$RESNET.tmp" "$RESNET"
fi

"${LOAD[@]}" suite --label fashion-csg --model models/fashion-csg.onnx --ort-library "$ORT" \
  --out "$WORK/fashion-csg.json" "${TINY[@]}"
"${LOAD[@]}" suite --label resnet18-128 --model "$RESNET" --ort-library "$ORT" \
  --out "$WORK/resnet18-128.json" "${BIG[@]}"
"${LOAD[@]}" table "$WORK/fashion-csg.json" "$WORK/resnet18-128.json" \
  --json "$OUT/cpu-latest.json" --md "$OUT/cpu-latest.md"
"${LOAD[@]}" forward-cost --model models/fashion-csg.onnx --ort-library "$ORT" \
  --out "$OUT/forward-cost-fashion-csg.json" "${TINY_FWD[@]}"
"${LOAD[@]}" forward-cost --model "$RESNET" --ort-library "$ORT" \
  --out "$OUT/forward-cost-resnet18-128.json" "${BIG_FWD[@]}"
echo "load after: $(uptime)"
