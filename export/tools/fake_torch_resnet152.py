#!/usr/bin/env python3
"""Writes a ResNet-152-sized official-format CSG checkpoint (~233 MB) without PyTorch.

For measuring csg-export's time and memory on the official model's size (no torch here):
    python3 export/tools/fake_torch_resnet152.py /tmp/r152.pt      # needs numpy
    /usr/bin/time -v target/debug/csg-export export /tmp/r152.pt -o /tmp/r152.onnx

The archive has torch.save's layout (archive/data.pkl, archive/data/<key>, byteorder,
version); the pickle references torch._utils._rebuild_tensor_v2 and torch.FloatStorage
through stand-in modules, so it unpickles in PyTorch too. Weights are random: the point is
the format and the size, not the outputs.
"""
import sys, types, pickle, zipfile, io, collections
import numpy as np

torch = types.ModuleType("torch"); utils = types.ModuleType("torch._utils")
sys.modules["torch"] = torch; sys.modules["torch._utils"] = utils
def _rebuild_tensor_v2(*a): pass
_rebuild_tensor_v2.__module__ = "torch._utils"; utils._rebuild_tensor_v2 = _rebuild_tensor_v2
class FloatStorage: pass
class LongStorage: pass
FloatStorage.__module__ = LongStorage.__module__ = "torch"
torch.FloatStorage = FloatStorage; torch.LongStorage = LongStorage

class Storage:
    def __init__(self, key, cls, n): self.key, self.cls, self.n = key, cls, n
class T:
    def __init__(self, storage, shape):
        self.storage, self.shape = storage, shape
    def __reduce__(self):
        stride = []; acc = 1
        for d in reversed(self.shape): stride.insert(0, acc); acc *= d
        return (_rebuild_tensor_v2, (self.storage, 0, tuple(self.shape), tuple(stride), False, collections.OrderedDict()))

rng = np.random.default_rng(0)
blobs = {}
sd = collections.OrderedDict()
def add(name, arr, cls=FloatStorage):
    key = str(len(blobs)); blobs[key] = arr.tobytes()
    sd["module." + name] = T(Storage(key, cls, arr.size), list(arr.shape))
def conv(name, o, i, k): add(name, (rng.standard_normal((o, i, k, k), dtype=np.float32) * (2.0 / (i*k*k))**0.5))
def bn(p, c):
    add(p+".weight", rng.uniform(0.5, 1.5, c).astype(np.float32)); add(p+".bias", rng.uniform(-.1, .1, c).astype(np.float32))
    add(p+".running_mean", rng.uniform(-.1, .1, c).astype(np.float32)); add(p+".running_var", rng.uniform(.5, 2, c).astype(np.float32))
    add(p+".num_batches_tracked", np.array(7, dtype=np.int64), LongStorage)
conv("conv1.weight", 64, 3, 7); bn("bn1", 64)
inp = 64
for l, (depth, w) in enumerate(zip([3, 8, 36, 3], [64, 128, 256, 512])):
    for b in range(depth):
        p = f"layer{l+1}.{b}"; out = w * 4; stride = 2 if (l > 0 and b == 0) else 1
        conv(p+".conv1.weight", w, inp, 1); bn(p+".bn1", w)
        conv(p+".conv2.weight", w, w, 3); bn(p+".bn2", w)
        conv(p+".conv3.weight", out, w, 1); bn(p+".bn3", out)
        if stride != 1 or inp != out:
            conv(p+".downsample.0.weight", out, inp, 1); bn(p+".downsample.1", out)
        inp = out
add("fc.weight", rng.standard_normal((6, 2048), dtype=np.float32) * 0.02); add("fc.bias", np.zeros(6, np.float32))
g = rng.uniform(0, 1, (2048, 6)).astype(np.float32); g /= g.max(1, keepdims=True); add("lmask.mask", g)
obj = {"epoch": 150, "model_state_dict": sd, "best_acc": 0.9}

class P(pickle.Pickler):
    def persistent_id(self, o):
        if isinstance(o, Storage): return ("storage", o.cls, o.key, "cpu", o.n)
        return None
buf = io.BytesIO(); P(buf, protocol=2).dump(obj)
with zipfile.ZipFile(sys.argv[1], "w", zipfile.ZIP_STORED) as z:
    z.writestr("archive/data.pkl", buf.getvalue())
    z.writestr("archive/byteorder", "little")
    for k, v in blobs.items(): z.writestr(f"archive/data/{k}", v)
    z.writestr("archive/version", "3\n")
print("params", sum(len(v) for v in blobs.values()) / 4 / 1e6, "M")
