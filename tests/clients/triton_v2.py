"""Drives csgd's Open Inference Protocol routes with Triton's official HTTP client, unmodified.

Usage: python3 triton_v2.py HOST:PORT MODEL FASHION_DIR
Needs `pip install tritonclient[http] numpy`. Run by tests/v2.rs, which skips when the
packages are missing. Exits non-zero (with the reason) on any mismatch; prints a JSON summary.
"""

import gzip
import json
import struct
import sys
import zlib

import numpy as np
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException


def png(pixels: bytes) -> bytes:
    """A 28x28 grayscale PNG of raw bytes, without PIL."""
    raw = b"".join(b"\x00" + pixels[i * 28 : (i + 1) * 28] for i in range(28))

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", 28, 28, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def main() -> None:
    url, model, data_dir = sys.argv[1], sys.argv[2], sys.argv[3]
    n = 8
    images = gzip.open(f"{data_dir}/t10k-images-idx3-ubyte.gz").read()[16 : 16 + n * 784]
    labels = list(gzip.open(f"{data_dir}/t10k-labels-idx1-ubyte.gz").read()[8 : 8 + n])
    pixels = [images[i * 784 : (i + 1) * 784] for i in range(n)]

    client = httpclient.InferenceServerClient(url=url)
    assert client.is_server_live(), "server not live"
    assert client.is_server_ready(), "server not ready"
    assert client.is_model_ready(model), "model not ready"
    server = client.get_server_metadata()
    assert server["name"] == "csgd", server
    meta = client.get_model_metadata(model)
    assert meta["name"] == model, meta
    inputs = {i["datatype"]: i for i in meta["inputs"]}
    outputs = [o["name"] for o in meta["outputs"]]
    assert {"logits", "predicted_class", "score"} <= set(outputs), outputs
    version = meta["versions"][0]
    assert client.get_model_metadata(model, model_version=version)["name"] == model

    # FP32, normalised as the model's input spec says; numpy through the binary extension.
    spec = meta["parameters"]["input"]
    lo, hi = spec["value_range"]
    x = np.frombuffer(b"".join(pixels), dtype=np.uint8).astype(np.float32)
    x = (lo + x / 255.0 * (hi - lo) - spec["mean"][0]) / spec["std"][0]
    x = x.reshape(n, 1, 28, 28).astype(np.float32)
    fp32 = httpclient.InferInput(inputs["FP32"]["name"], list(x.shape), "FP32")
    fp32.set_data_from_numpy(x)
    result = client.infer(model, [fp32], request_id="fp32")
    classes_fp32 = result.as_numpy("predicted_class")
    logits = result.as_numpy("logits")
    assert logits.shape == (n, len(meta["parameters"]["classes"])), logits.shape
    assert classes_fp32.shape == (n,), classes_fp32.shape
    assert (np.argmax(logits, axis=1) == classes_fp32).all()
    assert result.get_response()["id"] == "fp32"

    # BYTES holding PNG files, binary; then JSON (base64 text) asking for chosen outputs.
    blobs = np.array([png(p) for p in pixels], dtype=np.object_)
    by = httpclient.InferInput(inputs["BYTES"]["name"], [n], "BYTES")
    by.set_data_from_numpy(blobs)
    result = client.infer(model, [by])
    classes_png = result.as_numpy("predicted_class")
    assert (classes_png == classes_fp32).all(), (classes_png, classes_fp32)
    import base64

    text = np.array([base64.b64encode(png(p)) for p in pixels], dtype=np.object_)
    js = httpclient.InferInput(inputs["BYTES"]["name"], [n], "BYTES")
    js.set_data_from_numpy(text, binary_data=False)
    wanted = [httpclient.InferRequestedOutput("score", binary_data=False)]
    if "is_adversarial" in outputs:
        wanted.append(httpclient.InferRequestedOutput("is_adversarial", binary_data=True))
    result = client.infer(model, [js], outputs=wanted, model_version=version)
    score = result.as_numpy("score")
    assert score.shape == (n,) and np.isfinite(score).all(), score
    assert result.as_numpy("predicted_class") is None
    flags = result.as_numpy("is_adversarial") if "is_adversarial" in outputs else None
    if flags is not None:
        assert flags.dtype == np.bool_ and flags.shape == (n,), flags

    # A wrong shape is a 400 with the protocol's error body.
    bad = httpclient.InferInput(inputs["FP32"]["name"], [1, 1, 27, 28], "FP32")
    bad.set_data_from_numpy(np.zeros((1, 1, 27, 28), dtype=np.float32))
    try:
        client.infer(model, [bad])
        raise AssertionError("a wrong shape was accepted")
    except InferenceServerException as e:
        assert e.status() == "400", e.status()
        assert "shape" in e.message(), e.message()
    try:
        client.get_model_metadata("no-such-model")
        raise AssertionError("an unknown model was found")
    except InferenceServerException as e:
        assert e.status() == "404", e.status()

    correct = int((classes_fp32 == np.array(labels)).sum())
    print(json.dumps({
        "server": server,
        "outputs": outputs,
        "predicted": classes_fp32.tolist(),
        "labels": labels,
        "correct": correct,
        "scores": score.tolist(),
        "flags": None if flags is None else flags.tolist(),
    }))


if __name__ == "__main__":
    main()
