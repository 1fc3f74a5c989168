#!/usr/bin/env python3
"""An agentmesh external trainer in plain numpy (see README.md for the protocol).

    python3 train.py REQUEST_JSON

Trains the model described in the request (softmax regression or a ReLU MLP,
agentmesh's parameter layout) on the CSV data with minibatch SGD + momentum,
and writes the parameter update and the metrics next to the request.
"""
import json
import struct
import sys

import numpy as np


def read_safetensors(path):
    """Returns (metadata dict, {name: float32 array})."""
    with open(path, "rb") as f:
        blob = f.read()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + n])
    meta = header.pop("__metadata__", {})
    data = blob[8 + n :]
    tensors = {}
    for name, info in header.items():
        if info["dtype"] != "F32":
            raise ValueError(f"{name}: dtype {info['dtype']}, expected F32")
        start, end = info["data_offsets"]
        tensors[name] = np.frombuffer(data[start:end], dtype="<f4").reshape(info["shape"]).copy()
    return meta, tensors


def write_safetensors(path, tensors, meta):
    header = {"__metadata__": meta}
    offset = 0
    chunks = []
    for name in sorted(tensors):
        raw = np.ascontiguousarray(tensors[name], dtype="<f4").tobytes()
        header[name] = {
            "dtype": "F32",
            "shape": list(tensors[name].shape),
            "data_offsets": [offset, offset + len(raw)],
        }
        chunks.append(raw)
        offset += len(raw)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # safetensors pads the header to 8 bytes
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for c in chunks:
            f.write(c)


def layers(tensors):
    count = len(tensors) // 2
    return [(tensors[f"layers.{i}.weight"], tensors[f"layers.{i}.bias"]) for i in range(count)]


def forward(params, x):
    """Pre-activations of every layer; the last is the logits."""
    outs = []
    a = x
    for i, (w, b) in enumerate(params):
        z = a @ w + b
        outs.append(z)
        a = np.maximum(z, 0.0)
    return outs


def loss_and_grads(params, x, y):
    outs = forward(params, x)
    logits = outs[-1]
    logits = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(axis=1, keepdims=True)
    n = x.shape[0]
    loss = -np.log(np.maximum(p[np.arange(n), y], 1e-30)).mean()
    dz = p
    dz[np.arange(n), y] -= 1.0
    dz /= n
    grads = [None] * len(params)
    for i in range(len(params) - 1, -1, -1):
        a = x if i == 0 else np.maximum(outs[i - 1], 0.0)
        grads[i] = (a.T @ dz, dz.sum(axis=0))
        if i > 0:
            dz = (dz @ params[i][0].T) * (outs[i - 1] > 0)
    return loss, grads


def main():
    with open(sys.argv[1]) as f:
        req = json.load(f)
    if req["protocol"] != 1:
        sys.exit(f"unsupported protocol {req['protocol']}")
    meta, tensors = read_safetensors(req["model"])
    data = np.loadtxt(req["data"], delimiter=",", dtype=np.float64, ndmin=2)
    x = data[:, :-1].astype(np.float32)
    y = data[:, -1].astype(np.int64)

    start = {k: v.copy() for k, v in tensors.items()}
    params = layers(tensors)  # views into `tensors`, updated in place
    velocity = [(np.zeros_like(w), np.zeros_like(b)) for w, b in params]
    lr, mu = req["learning_rate"], req["momentum"]
    rng = np.random.default_rng(req["seed"])
    for _ in range(req["epochs"]):
        order = rng.permutation(len(y))
        for s in range(0, len(y), req["batch_size"]):
            idx = order[s : s + req["batch_size"]]
            _, grads = loss_and_grads(params, x[idx], y[idx])
            for (w, b), (vw, vb), (gw, gb) in zip(params, velocity, grads):
                vw *= mu
                vw += gw
                vb *= mu
                vb += gb
                w -= lr * vw
                b -= lr * vb

    loss, _ = loss_and_grads(params, x, y)
    accuracy = float((forward(params, x)[-1].argmax(axis=1) == y).mean())
    delta = {k: tensors[k] - start[k] for k in tensors}
    write_safetensors(req["update"], delta, dict(meta, content="update"))
    with open(req["result"], "w") as f:
        json.dump({"examples": int(len(y)), "loss": float(loss), "accuracy": accuracy}, f)


if __name__ == "__main__":
    main()
