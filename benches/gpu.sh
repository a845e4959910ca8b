#!/usr/bin/env bash
# The load benchmark on a GPU machine: builds with `--features gpu` and measures the
# ResNet-18-sized model served with the CUDA provider, then the TensorRT provider (engine
# cache on; the first TensorRT run builds the engine, the warm-up absorbs it), each against
# the in-process limit on the same provider. Same table as benches/load.sh, written to
# benches/results/gpu-latest.{json,md}.
#
# Needs the onnxruntime-gpu library (ORT_DYLIB_PATH, REFERENCE §5) with CUDA 13, cuDNN 9 and
# TensorRT 10 runtime libraries on the loader path. Not run yet: written on a machine without
# a GPU.
#
#   ORT_DYLIB_PATH=/path/to/onnxruntime-gpu/libonnxruntime.so benches/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."

NICE=${NICE-}
WORK=${CSGD_BENCH_DIR:-target/bench-gpu}
RESNET_PT=${RESNET_PT:-/work/shared/fixtures/resnet18-csg-official.pt}
ORT=${ORT_DYLIB_PATH:?set ORT_DYLIB_PATH to the onnxruntime-gpu libonnxruntime.so}
OUT=${CSGD_BENCH_OUT:-benches/results}
mkdir -p "$WORK" "$OUT" "$WORK/trt-cache"
echo "load before: $(uptime)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true

$NICE cargo build --release -p csgd --features gpu --bin csgd
$NICE cargo build --release -p csg-export --bin csg-export
LOAD=($NICE cargo bench -p csgd --features gpu --bench load --)

RESNET=$WORK/resnet18-128.onnx
if [[ ! -f $RESNET ]]; then
  $NICE target/release/csg-export export "$RESNET_PT" -o "$RESNET.tmp" --name resnet18-128 --input-size 128
  # Random weights predict one class for nearly everything, so `csgd calibrate` cannot fit
  # it; the stand-in runs the real fitting code on synthetic outputs (see benches/load).
  "${LOAD[@]}" stand-in-calibration "$RESNET.tmp" --ort-library "$ORT"
  mv "$RESNET.tmp" "$RESNET"
fi

# Larger batches pay off on a GPU; more connections keep it fed.
ARGS=(--rounds 3 --secs 10 --latency-secs 20 --batches 1,8,16,32,64,128 --conns 128
      --set batching.max_batch_size=128)
"${LOAD[@]}" suite --label resnet18-128-cuda --model "$RESNET" --ort-library "$ORT" \
  --provider cuda --provider cpu --out "$WORK/cuda.json" "${ARGS[@]}"
"${LOAD[@]}" suite --label resnet18-128-tensorrt --model "$RESNET" --ort-library "$ORT" \
  --provider tensorrt --provider cuda --provider cpu --trt-engine-cache "$WORK/trt-cache" \
  --out "$WORK/tensorrt.json" "${ARGS[@]}"
"${LOAD[@]}" table "$WORK/cuda.json" "$WORK/tensorrt.json" \
  --json "$OUT/gpu-latest.json" --md "$OUT/gpu-latest.md"
echo "load after: $(uptime)"
