#!/usr/bin/env bash
# Writes valid seed inputs of every fuzz target from the repository's own fixtures: small ones
# into fuzz/seeds/<target>/ (committed, with the inputs fuzzing found worth keeping), large
# ones (the shipped bundle, checkpoints) into the working corpus fuzz/corpus/<target>/
# (ignored by git). Run a target on both: `cargo +nightly fuzz run request fuzz/corpus/request
# fuzz/seeds/request`.
set -euo pipefail
cd "$(dirname "$0")/.."
C=fuzz/seeds
W=fuzz/corpus
mkdir -p $C/request $C/v2_request $C/tensor_json
mkdir -p $W/request $W/v2_request $W/tensor_json $W/checkpoint $W/bundle_meta
FIXTURES=${FIXTURES:-../shared/fixtures}
python3 - "$C" <<'PY'
import base64, json, os, sys, struct
c = sys.argv[1]
png = open("tests/data/adversarial/00000.png", "rb").read()
b64 = base64.b64encode(png).decode()
def w(target, name, data):
    with open(os.path.join(c, target, name), "wb") as f:
        f.write(data)
# request: first byte selects the form (see fuzz_targets/request.rs).
w("request", "raw-png", b"\x00" + png)
w("request", "raw-sniffed", b"\x02" + png)
# An animated PNG (refused) and a CMYK JPEG (converted): decoder paths of their own.
w("request", "raw-apng", b"\x00" + open("tests/data/hostile/animated.png", "rb").read())
w("request", "raw-cmyk-jpeg", b"\x01" + open("tests/data/hostile/cmyk.jpg", "rb").read())
part = (b"--b\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\n"
        b"Content-Type: image/png\r\n\r\n" + png + b"\r\n--b--\r\n")
w("request", "multipart-any", b"\x03" + part)
w("request", "multipart-named", b"\x04" + part)
w("request", "json-pointer", b"\x05" + json.dumps({"image": b64}).encode())
tensor = {"inputs": [{"name": "input", "shape": [1, 1, 28, 28], "datatype": "FP32",
                      "data": [0.5] * 784}]}
w("request", "v2-fp32", b"\x06" + json.dumps(tensor).encode())
byts = {"inputs": [{"name": "input", "shape": [1], "datatype": "BYTES", "data": [b64]}]}
w("request", "v2-bytes", b"\x06" + json.dumps(byts).encode())
header = json.dumps({"inputs": [{"name": "input", "shape": [1, 1, 28, 28], "datatype": "FP32",
                                 "parameters": {"binary_data_size": 784 * 4}}]}).encode()
binary = header + struct.pack("<784f", *([0.25] * 784))
# 0x87: binary extension, header length = body length / 1 (the fuzzer finds the rest).
w("request", "v2-binary", b"\x07" + binary)
w("v2_request", "fp32", b"\x00" + json.dumps(tensor).encode())
w("v2_request", "bytes", b"\x00" + json.dumps(byts).encode())
w("v2_request", "binary", b"\x01" + binary)
w("tensor_json", "chw", json.dumps([[[0.1, 0.2, 0.3, 0.4]] * 4]).encode())
w("tensor_json", "nchw", json.dumps([[[[0.5] * 4] * 4]] * 2).encode())
PY
# The bundle's metadata scan reads the protobuf up to the metadata, so the whole bundle is the
# seed (about 1.3 MB: run with -max_len to match).
cp models/fashion-csg.onnx $W/bundle_meta/fashion-csg.onnx
for f in "$FIXTURES"/basic-narrow-std-bare.pt "$FIXTURES"/bottleneck-narrow-csg-official.pt; do
  if [[ -f $f ]]; then cp "$f" $W/checkpoint/; fi
done
cp models/fashion-csg.safetensors $W/checkpoint/
echo "seeds written under $C and $W"
