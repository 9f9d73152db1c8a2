"""Independent numpy reference for the worker's Llama forward pass (tests only).

Reads a GGUF file itself (no llama.cpp, no shared code with the Rust side),
dequantizes F32/F16/Q4_0/Q4_1/Q8_0 tensors, and runs the full causal forward pass in
float64 without a KV cache.

    python llama_ref.py MODEL.gguf OUT.bin < jobs.json

where jobs.json is `[{"tokens": [ids...], "steps": N}, ...]`, writes for each job, as
little-endian float32: the logits of every prompt position ([n_tokens, vocab]), then
N greedy token ids (as float32).
"""
import json
import struct
import sys

import numpy as np

TYPES = {0: ("B", 1), 1: ("b", 1), 2: ("H", 2), 3: ("h", 2), 4: ("I", 4), 5: ("i", 4),
         6: ("f", 4), 7: ("?", 1), 10: ("Q", 8), 11: ("q", 8), 12: ("d", 8)}
BLOCK = {0: (1, 4), 1: (1, 2), 2: (32, 18), 3: (32, 20), 8: (32, 34)}


class Reader:
    def __init__(self, buf):
        self.buf, self.pos = buf, 0

    def take(self, fmt):
        v = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += struct.calcsize("<" + fmt)
        return v[0]

    def string(self):
        n = self.take("Q")
        s = bytes(self.buf[self.pos:self.pos + n]).decode("utf-8", "replace")
        self.pos += n
        return s

    def value(self, t):
        if t == 8:
            return self.string()
        if t == 9:
            inner, n = self.take("I"), self.take("Q")
            return [self.value(inner) for _ in range(n)]
        return self.take(TYPES[t][0])


def load(path):
    buf = np.memmap(path, dtype=np.uint8, mode="r")
    r = Reader(buf)
    assert bytes(buf[:4]) == b"GGUF"
    r.pos = 4
    r.take("I")
    n_tensors, n_kv = r.take("Q"), r.take("Q")
    meta = {}
    for _ in range(n_kv):
        k = r.string()
        meta[k] = r.value(r.take("I"))
    infos = []
    for _ in range(n_tensors):
        name = r.string()
        dims = [r.take("Q") for _ in range(r.take("I"))]
        infos.append((name, dims, r.take("I"), r.take("Q")))
    align = meta.get("general.alignment", 32)
    base = (r.pos + align - 1) // align * align
    tensors = {}
    for name, dims, ty, off in infos:
        n = int(np.prod(dims))
        bs, bb = BLOCK[ty]
        raw = np.asarray(buf[base + off: base + off + n // bs * bb])
        tensors[name] = dequant(ty, raw, n).reshape(list(reversed(dims)))
    return meta, tensors


def dequant(ty, raw, n):
    if ty == 0:
        return raw.view("<f4").astype(np.float64)
    if ty == 1:
        return raw.view("<f2").astype(np.float64)
    bs, bb = BLOCK[ty]
    blocks = raw.reshape(-1, bb)
    d = blocks[:, 0:2].copy().view("<f2").astype(np.float64)
    if ty == 8:
        q = blocks[:, 2:34].copy().view(np.int8).astype(np.float64)
        return (q * d).reshape(-1)
    qs = blocks[:, bb - 16:]
    q = np.concatenate([qs & 15, qs >> 4], axis=1).astype(np.float64)
    if ty == 2:
        return ((q - 8) * d).reshape(-1)
    m = blocks[:, 2:4].copy().view("<f2").astype(np.float64)
    return (q * d + m).reshape(-1)


def forward(meta, t, tokens, cache=None, last_only=False):
    """Causal forward pass of `tokens`, continuing from `cache` (a list of per-layer
    (keys, values) that is extended in place) when given."""
    arch = meta["general.architecture"]
    n_layers = meta[f"{arch}.block_count"]
    n_heads = meta[f"{arch}.attention.head_count"]
    n_kv = meta[f"{arch}.attention.head_count_kv"]
    eps = meta[f"{arch}.attention.layer_norm_rms_epsilon"]
    theta = meta.get(f"{arch}.rope.freq_base", 10000.0)
    emb = t["token_embd.weight"]
    x = emb[tokens]
    n, dim = x.shape
    hd = dim // n_heads
    past = 0 if not cache else cache[0][0].shape[0]
    inv = 1.0 / theta ** (np.arange(0, hd, 2) / hd)
    ang = (past + np.arange(n))[:, None] * inv[None, :]
    cos, sin = np.cos(ang), np.sin(ang)

    def norm(v, w):
        return v / np.sqrt((v * v).mean(-1, keepdims=True) + eps) * w

    def rope(v, heads):
        v = v.reshape(n, heads, hd // 2, 2)
        a, b = v[..., 0], v[..., 1]
        c, s = cos[:, None, :], sin[:, None, :]
        return np.stack([a * c - b * s, a * s + b * c], -1).reshape(n, heads, hd)

    mask = np.triu(np.full((n, past + n), -np.inf), past + 1)
    for l in range(n_layers):
        p = f"blk.{l}."
        h = norm(x, t[p + "attn_norm.weight"])
        q = rope(h @ t[p + "attn_q.weight"].T, n_heads)
        k = rope(h @ t[p + "attn_k.weight"].T, n_kv)
        v = (h @ t[p + "attn_v.weight"].T).reshape(n, n_kv, hd)
        if cache is not None:
            if len(cache) <= l:
                cache.append((k[:0], v[:0]))
            k = np.concatenate([cache[l][0], k])
            v = np.concatenate([cache[l][1], v])
            cache[l] = (k, v)
        g = n_heads // n_kv
        k = np.repeat(k, g, axis=1)
        v = np.repeat(v, g, axis=1)
        s = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(hd) + mask
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        o = np.einsum("hqk,khd->qhd", s, v).reshape(n, dim)
        x = x + o @ t[p + "attn_output.weight"].T
        h = norm(x, t[p + "ffn_norm.weight"])
        a = h @ t[p + "ffn_gate.weight"].T
        u = h @ t[p + "ffn_up.weight"].T
        x = x + (a / (1 + np.exp(-a)) * u) @ t[p + "ffn_down.weight"].T
    out = t.get("output.weight", emb)
    if last_only:
        x = x[-1:]
    return norm(x, t["output_norm.weight"]) @ out.T


def main():
    path, out = sys.argv[1], sys.argv[2]
    jobs = json.load(sys.stdin)
    meta, t = load(path)
    with open(out, "wb") as f:
        for job in jobs:
            tokens, steps = job["tokens"], job["steps"]
            # The prompt in one causal pass (no cache), then greedy steps with a cache.
            logits = forward(meta, t, tokens)
            cache = []
            last = forward(meta, t, tokens, cache, last_only=True)[-1]
            greedy = []
            for _ in range(steps):
                nxt = int(np.argmax(last))
                greedy.append(nxt)
                last = forward(meta, t, [nxt], cache, last_only=True)[-1]
            f.write(logits.astype("<f4").tobytes())
            f.write(np.array(greedy, dtype="<f4").tobytes())


if __name__ == "__main__":
    main()
