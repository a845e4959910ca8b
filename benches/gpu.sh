#!/usr/bin/env bash
# The load benchmark on a GPU machine: the ResNet-18-sized model served with the CUDA provider,
# then TensorRT (engine cache on; the warm-up absorbs the engine build) where its libraries
# are present, each against the in-process limit on the same provider. Same table as
# benches/load.sh, written as gpu-latest.{json,md}.
#
# The device machines lent to this project (.library/device) have no Rust toolchain and no
# onnxruntime-gpu, nothing can be fetched there, and one call carries at most 64 MiB. So the
# work is split in two:
#
#   benches/gpu.sh kit         # here: builds csgd and the load bench with `--features gpu`,
#                              # exports the model, takes ONNX Runtime's GPU libraries from the
#                              # onnxruntime-gpu wheel, and packs it all into gpu-kit/parts/
#                              # (≤ 52 MiB each; the CUDA provider alone is 284 MB)
#   benches/gpu.sh run DIR [cuda|tensorrt|both]
#                              # there: unpacks the parts gathered in DIR, puts the image's CUDA
#                              # and cuDNN libraries (its nvidia-* Python packages) on the loader
#                              # path, runs the suites, writes the tables into $OUT (or
#                              # benches/results)
#
# `kit` prints the device calls to make: one per part, each copying its part into
# /tmp/csgd-gpu-parts on the warm machine, then the run. Needs: pip (the wheel), strip.
set -euo pipefail
cd "$(dirname "$0")/.."

KIT=${GPU_KIT:-gpu-kit}
ORT_GPU_VERSION=${ORT_GPU_VERSION:-1.31.1}
RESNET_PT=${RESNET_PT:-/work/shared/fixtures/resnet18-csg-official.pt}
PART_SIZE=${PART_SIZE:-52m}
# Larger batches pay off on a GPU; more connections keep it fed; 16 cores leave the client a
# core for evenly spaced requests.
SUITE_ARGS=(--rounds 2 --secs 8 --latency-secs 10 --batches 1,8,16,32,64,128 --conns 128
            --cost-pairs 4 --cost-secs 3 --set batching.max_batch_size=128 --pacing thread)

kit() {
  local work=target/gpu-kit-work
  rm -rf "$KIT" && mkdir -p "$KIT/bin" "$KIT/ort" "$KIT/parts" "$work"

  # ONNX Runtime with the CUDA and TensorRT providers, from the PyPI wheel (CUDA 13 build).
  if ! ls "$work"/onnxruntime_gpu-"$ORT_GPU_VERSION"-*.whl >/dev/null 2>&1; then
    python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp --platform manylinux_2_28_x86_64 -d "$work" \
      "onnxruntime-gpu==$ORT_GPU_VERSION"
  fi
  local wheel
  wheel=$(ls "$work"/onnxruntime_gpu-"$ORT_GPU_VERSION"-*.whl | head -n1)
  unzip -q -o -j "$wheel" "onnxruntime/capi/libonnxruntime.so.$ORT_GPU_VERSION" \
    'onnxruntime/capi/libonnxruntime_providers_*.so' -d "$KIT/ort"
  # The providers are looked up beside the library, under these names.
  mv "$KIT/ort/libonnxruntime.so.$ORT_GPU_VERSION" "$KIT/ort/libonnxruntime.so"

  cargo build --release -p csgd --features gpu --bin csgd
  cargo build --release -p csg-export --bin csg-export
  local load
  load=$(cargo bench -p csgd --features gpu --bench load --no-run --message-format=json \
    | python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "load" and m.get("executable"):
        print(m["executable"])')
  strip -o "$KIT/bin/csgd" target/release/csgd
  strip -o "$KIT/bin/load" "$load"

  # Random weights: the stand-in calibration, as in benches/load.sh (on the CPU library).
  target/release/csg-export export "$RESNET_PT" -o "$work/resnet18-128.onnx.tmp" \
    --name resnet18-128 --input-size 128
  "$KIT/bin/load" stand-in-calibration "$work/resnet18-128.onnx.tmp" \
    --ort-library "${ORT_DYLIB_PATH:-.ort/libonnxruntime.so}"
  mv "$work/resnet18-128.onnx.tmp" "$KIT/resnet18-128.onnx"

  # xz, not gzip: 240 MB instead of 282, five parts instead of six.
  tar -C "$KIT" -cf - bin ort resnet18-128.onnx | xz -T2 -6 \
    | split -b "$PART_SIZE" -d -a 2 - "$KIT/parts/kit.txz."
  echo "kit in $KIT/parts ($(du -sh "$KIT/parts" | cut -f1)). Device calls, back to back (a warm"
  echo "machine keeps /tmp between calls; it goes back after ~30 s idle):"
  for part in "$KIT"/parts/kit.txz.*; do
    echo "  run carry=[\"$part\"]: mkdir -p /tmp/csgd-gpu-parts && cp $part /tmp/csgd-gpu-parts/"
  done
  echo "  run: benches/gpu.sh run /tmp/csgd-gpu-parts"
}

run() {
  local parts=${1:?usage: benches/gpu.sh run DIR [cuda|tensorrt|both]} which=${2:-both}
  local kit=/tmp/csgd-gpu-kit out=${OUT:-benches/results}
  # Unpacked once per machine, so the two providers can run in separate calls (each call is
  # limited to 10 minutes).
  if [[ ! -x $kit/bin/load ]]; then
    rm -rf "$kit" && mkdir -p "$kit"
    # Python's tarfile reads xz whether or not the machine has the xz tool.
    cat "$parts"/kit.txz.* | python3 -c 'import sys, tarfile
tarfile.open(fileobj=sys.stdin.buffer, mode="r|xz").extractall(sys.argv[1], filter="tar")' "$kit"
  fi
  mkdir -p "$kit/trt-cache" "$out"
  # CUDA 13, cuBLAS and cuDNN 9 from the image's nvidia-* Python packages.
  local libs
  libs=$(python3 -c 'import glob, os, site
dirs = set()
for root in site.getsitepackages():
    for pkg in ("nvidia", "tensorrt_libs"):
        for so in glob.glob(os.path.join(root, pkg, "**", "lib*.so*"), recursive=True):
            dirs.add(os.path.dirname(so))
print(":".join(sorted(dirs)))' 2>/dev/null || true)
  # libcuda.so.1 comes with the driver (mounted at /usr/local/nvidia on those machines).
  [[ -d /usr/local/nvidia/lib64 ]] && libs=${libs:+$libs:}/usr/local/nvidia/lib64
  export LD_LIBRARY_PATH=${libs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  echo "load before: $(uptime)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true

  local load=("$kit/bin/load") common=(--model "$kit/resnet18-128.onnx" --csgd "$kit/bin/csgd"
    --ort-library "$kit/ort/libonnxruntime.so")
  if [[ $which != tensorrt ]]; then
    "${load[@]}" suite --label resnet18-128-cuda "${common[@]}" --provider cuda --provider cpu \
      --out "$kit/cuda.json" "${SUITE_ARGS[@]}"
  fi
  if [[ $which != cuda ]]; then
    if ldconfig -p 2>/dev/null | grep -q 'libnvinfer\.so\.10' \
      || python3 -c 'import tensorrt_libs' 2>/dev/null; then
      "${load[@]}" suite --label resnet18-128-tensorrt "${common[@]}" --provider tensorrt \
        --provider cuda --provider cpu --trt-engine-cache "$kit/trt-cache" \
        --out "$kit/tensorrt.json" "${SUITE_ARGS[@]}"
    else
      echo "TensorRT: no libnvinfer.so.10 on this machine; its suite is skipped"
    fi
  fi
  # Every suite run on this machine so far, in one table.
  local tables=()
  for suite in cuda tensorrt; do
    [[ -f $kit/$suite.json ]] && tables+=("$kit/$suite.json") && cp "$kit/$suite.json" "$out/gpu-$suite.json"
  done
  if [[ ${#tables[@]} -eq 0 ]]; then
    echo "no suite has run on this machine" >&2
    return 1
  fi
  "${load[@]}" table "${tables[@]}" --json "$out/gpu-latest.json" --md "$out/gpu-latest.md"
  echo "load after: $(uptime)"
}

case ${1:-} in
  kit) kit ;;
  run) shift; run "$@" ;;
  *) echo "usage: benches/gpu.sh kit | run DIR [cuda|tensorrt|both]" >&2; exit 2 ;;
esac
