"""An independent sentence-embedding reference for the worker's BERT encoder (tests only).

    echo '{"model": DIR, "ids": [[101, ..., 102], ...]}' | python bert_ref.py

Reads the sentence-transformers directory itself (config.json, model.safetensors,
1_Pooling/config.json, modules.json) and computes in float64 with numpy, the way
sentence-transformers runs BertModel: embeddings + LayerNorm, post-norm encoder layers
with exact-erf GELU, mean (or CLS / max) pooling, L2 normalisation when modules.json
lists Normalize. Prints the vectors as a JSON list.
"""
import json
import math
import os
import struct
import sys

import numpy as np

DTYPES = {"F32": "<f4", "F16": "<f2", "I64": "<i8"}


def read_safetensors(path):
    raw = open(path, "rb").read()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    out = {}
    for name, t in header.items():
        if name == "__metadata__" or t["dtype"] not in DTYPES:
            continue
        a, b = t["data_offsets"]
        out[name] = np.frombuffer(raw[8 + n + a: 8 + n + b], dtype=DTYPES[t["dtype"]]).reshape(t["shape"]).astype(np.float64)
    return out


ERF = np.vectorize(math.erf)


def layer_norm(x, w, b, eps):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * w + b


def main():
    req = json.load(sys.stdin)
    d = req["model"]
    cfg = json.load(open(os.path.join(d, "config.json")))
    pool = json.load(open(os.path.join(d, "1_Pooling", "config.json")))
    modules = json.load(open(os.path.join(d, "modules.json")))
    normalize = any(m["type"].endswith(".Normalize") for m in modules)
    t = read_safetensors(os.path.join(d, "model.safetensors"))
    p = "" if "embeddings.word_embeddings.weight" in t else "bert."
    eps, heads = cfg["layer_norm_eps"], cfg["num_attention_heads"]
    out = []
    for ids in req["ids"]:
        n = len(ids)
        x = t[p + "embeddings.word_embeddings.weight"][ids] + t[p + "embeddings.position_embeddings.weight"][:n] \
            + t[p + "embeddings.token_type_embeddings.weight"][0]
        x = layer_norm(x, t[p + "embeddings.LayerNorm.weight"], t[p + "embeddings.LayerNorm.bias"], eps)
        for l in range(cfg["num_hidden_layers"]):
            q = f"{p}encoder.layer.{l}."
            lin = lambda name, v: v @ t[q + name + ".weight"].T + t[q + name + ".bias"]
            hd = x.shape[1] // heads
            split = lambda v: v.reshape(n, heads, hd).transpose(1, 0, 2)
            qh, kh, vh = split(lin("attention.self.query", x)), split(lin("attention.self.key", x)), split(lin("attention.self.value", x))
            s = qh @ kh.transpose(0, 2, 1) / math.sqrt(hd)
            s = np.exp(s - s.max(-1, keepdims=True))
            s /= s.sum(-1, keepdims=True)
            ctx = (s @ vh).transpose(1, 0, 2).reshape(n, -1)
            x = layer_norm(x + lin("attention.output.dense", ctx), t[q + "attention.output.LayerNorm.weight"],
                           t[q + "attention.output.LayerNorm.bias"], eps)
            h = lin("intermediate.dense", x)
            h = 0.5 * h * (1 + ERF(h / math.sqrt(2)))
            x = layer_norm(x + lin("output.dense", h), t[q + "output.LayerNorm.weight"], t[q + "output.LayerNorm.bias"], eps)
        if pool.get("pooling_mode_cls_token"):
            v = x[0]
        elif pool.get("pooling_mode_max_tokens"):
            v = x.max(0)
        else:
            v = x.mean(0)
        if normalize:
            v = v / max(np.linalg.norm(v), 1e-12)
        out.append(v.tolist())
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
