#!/usr/bin/env bash
# Instructions per image of csgd's detect route against its classify route, counted by
# valgrind's callgrind on the whole daemon: repeatable where CPU time on these machines is
# not (the load bench's detect/classify pairs scatter by ±15 %). Timing-dependent batching is
# pinned: a long max_wait and waves of exactly BATCH concurrent requests, so every batch holds
# BATCH images on both routes; ONNX Runtime runs on one thread.
#
#   benches/route_instructions.sh        # ~10 minutes on 2 cores (valgrind is ~50× slower)
#
# Environment: MODEL (default models/fashion-csg.onnx), IMAGE (a PNG; default: Fashion-MNIST
# test image 0), WAVES per phase (5), BATCH (32), PORT (18080). Needs valgrind and curl.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${MODEL:-models/fashion-csg.onnx}
WAVES=${WAVES:-5}
BATCH=${BATCH:-32}
PORT=${PORT:-18080}
WORK=$(mktemp -d)
trap 'kill "$PID" 2>/dev/null || true; rm -rf "$WORK"' EXIT
if [[ -z ${IMAGE:-} ]]; then
  IMAGE=$WORK/image.png
  python3 - "$IMAGE" <<'PY'
import gzip, struct, sys, zlib
raw = gzip.open('/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz').read()[16:16 + 784]
rows = b''.join(b'\0' + raw[r * 28:(r + 1) * 28] for r in range(28))
chunk = lambda t, b: struct.pack('>I', len(b)) + t + b + struct.pack('>I', zlib.crc32(t + b))
open(sys.argv[1], 'wb').write(b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', 28, 28, 8, 0, 0, 0, 0))
                              + chunk(b'IDAT', zlib.compress(rows)) + chunk(b'IEND', b''))
PY
fi
cargo build --release --bin csgd
CSGD_SERVER__LISTEN=127.0.0.1:$PORT CSGD_BATCHING__MAX_WAIT_US=2000000 \
  CSGD_BATCHING__MAX_BATCH_SIZE=$BATCH CSGD_RUNTIME__INTRA_OP_THREADS=1 \
  valgrind --tool=callgrind --callgrind-out-file="$WORK/cg.out" \
  target/release/csgd serve --model "bench=$MODEL" > "$WORK/serve.log" 2>&1 &
PID=$!
for _ in $(seq 600); do
  curl -sf "localhost:$PORT/health/ready" > /dev/null && break
  sleep 1
done
wave() {
  seq "$BATCH" | xargs -P"$BATCH" -I{} curl -sf -o /dev/null --data-binary @"$IMAGE" \
    -H 'Content-Type: image/png' "localhost:$PORT/v1/$1"
}
wave detect
wave classify
phases=(detect classify detect classify)
for i in "${!phases[@]}"; do
  callgrind_control --zero "$PID" > /dev/null
  for _ in $(seq "$WAVES"); do wave "${phases[$i]}"; done
  callgrind_control --dump="${phases[$i]}" "$PID" > /dev/null
done
images=$((WAVES * BATCH))
for i in "${!phases[@]}"; do
  total=$(grep -m1 '^summary:' "$WORK/cg.out.$((i + 1))" | awk '{print $2}')
  echo "${phases[$i]} $((total / images))"
done | awk '{ per[NR] = $2; print $1, $2, "instructions per image" }
  END { printf "detect vs classify: %+.2f %%, %+.2f %%\n", (per[1] / per[2] - 1) * 100, (per[3] / per[4] - 1) * 100 }'
