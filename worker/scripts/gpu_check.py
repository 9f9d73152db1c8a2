"""The parts of worker/scripts/gpu-check.sh that are Python: make the test model, run
it through Hugging Face `transformers`, and print the one table.

    python gpu_check.py make-model --size 1b --tokenizer DIR --out DIR [--seed 0]
    python gpu_check.py torch --model DIR --ids FILE --out DIR --streams 1,8,32,64 ...
    python gpu_check.py table --out DIR --weights-bytes N

`make-model` needs numpy only (it also runs where there is no PyTorch); `torch` needs
PyTorch and transformers on a CUDA device; `table` reads what the others and
`worker bench --json` / `worker logits` wrote into the run folder and prints it.
"""
import argparse
import json
import os
import shutil
import struct
import sys
import time

import numpy as np

# Llama-shaped models: `1b` is Llama 3.2 1B's shape with the tokenizer's vocabulary;
# `tiny` checks the script's plumbing on a CPU.
SIZES = {
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8),
    "tiny": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
}

# Weights are N(0, 0.02), Llama's initializer range. The (tied) embedding is N(0, 0.1)
# so that logits spread about as a trained model's do (std ≈ 0.1 · √hidden); with 0.02
# they are nearly flat and argmax agreement would measure ties, not arithmetic.
WEIGHT_STD, EMBED_STD = 0.02, 0.1

# Peak memory bandwidth (GB/s) by device name, from the vendors' data sheets; a device
# not listed is compared with the copy bandwidth measured in the run.
PEAK_GBPS = {"H100 SXM": 3350, "H100 80GB HBM3": 3350, "H100 NVL": 3900, "H100 PCIe": 2000, "H200": 4800,
             "A100-SXM4-80GB": 2039, "A100-SXM4-40GB": 1555, "A100 80GB PCIe": 1935, "L40S": 864, "RTX 4090": 1008}


def bf16_bytes(a):
    """float32 → bfloat16 bits, round to nearest even."""
    u = np.ascontiguousarray(a, dtype="<f4").view("<u4")
    return ((u + (((u >> 16) & 1) + 0x7FFF)) >> 16).astype("<u2").tobytes()


def make_model(args):
    shape = SIZES[args.size]
    tok = json.load(open(os.path.join(args.tokenizer, "tokenizer.json")))
    tok_cfg = json.load(open(os.path.join(args.tokenizer, "tokenizer_config.json")))
    vocab = tok["model"]["vocab"]
    n_vocab = max(vocab.values()) + 1
    h, f, heads, kv = shape["hidden_size"], shape["intermediate_size"], shape["num_attention_heads"], shape["num_key_value_heads"]
    hd = h // heads
    rng = np.random.default_rng(args.seed)
    w = lambda *s: (rng.standard_normal(s, dtype=np.float32) * WEIGHT_STD)
    tensors = [("model.embed_tokens.weight", rng.standard_normal((n_vocab, h), dtype=np.float32) * EMBED_STD)]
    for l in range(shape["num_hidden_layers"]):
        q = f"model.layers.{l}."
        tensors += [
            (q + "input_layernorm.weight", np.ones(h, np.float32)),
            (q + "self_attn.q_proj.weight", w(heads * hd, h)),
            (q + "self_attn.k_proj.weight", w(kv * hd, h)),
            (q + "self_attn.v_proj.weight", w(kv * hd, h)),
            (q + "self_attn.o_proj.weight", w(h, heads * hd)),
            (q + "post_attention_layernorm.weight", np.ones(h, np.float32)),
            (q + "mlp.gate_proj.weight", w(f, h)),
            (q + "mlp.up_proj.weight", w(f, h)),
            (q + "mlp.down_proj.weight", w(h, f)),
        ]
    tensors.append(("model.norm.weight", np.ones(h, np.float32)))
    os.makedirs(args.out, exist_ok=True)
    # `format: pt` is what transformers' loader looks for in the metadata.
    header, off = {"__metadata__": {"format": "pt"}}, 0
    for name, a in tensors:
        n = a.size * 2
        header[name] = {"dtype": "BF16", "shape": list(a.shape), "data_offsets": [off, off + n]}
        off += n
    hb = json.dumps(header).encode()
    hb += b" " * (-len(hb) % 8)
    with open(os.path.join(args.out, "model.safetensors"), "wb") as out:
        out.write(struct.pack("<Q", len(hb)))
        out.write(hb)
        for _, a in tensors:
            out.write(bf16_bytes(a))
    eos = vocab.get(tok_cfg.get("eos_token"), 0)
    config = dict(shape, model_type="llama", architectures=["LlamaForCausalLM"], torch_dtype="bfloat16",
                  vocab_size=n_vocab, max_position_embeddings=2048, rope_theta=10000.0, rms_norm_eps=1e-5,
                  tie_word_embeddings=True, bos_token_id=vocab.get(tok_cfg.get("bos_token"), 0), eos_token_id=eos,
                  head_dim=hd, hidden_act="silu")
    json.dump(config, open(os.path.join(args.out, "config.json"), "w"), indent=1)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(args.tokenizer, name), os.path.join(args.out, name))
    params = sum(a.size for _, a in tensors)
    json.dump({"params": params, "weights_bytes": 2 * params, "size": args.size, "seed": args.seed},
              open(os.path.join(args.out, "made.json"), "w"))
    print(f"made a {args.size} Llama ({params / 1e9:.2f} B parameters, bf16, seed {args.seed}) in {args.out}")


def read_ids(path):
    return [int(t) for t in open(path).read().replace(",", " ").split()]


def torch_run(args):
    """transformers on the GPU: prefill, TTFT, decode at each stream count (greedy,
    exactly `decode_tokens` new tokens), memory, copy bandwidth, and the logits of the
    parity sequence."""
    out = {"ok": False}
    path = os.path.join(args.out, "torch.json")
    try:
        import torch
        import transformers
        from transformers import AutoModelForCausalLM
    except Exception as e:  # noqa: BLE001 - the reason goes into the table
        out["why"] = f"no PyTorch/transformers here ({type(e).__name__}: {e})"
        json.dump(out, open(path, "w"))
        print(out["why"])
        return
    if not torch.cuda.is_available():
        out["why"] = f"PyTorch {torch.__version__} sees no CUDA device"
        json.dump(out, open(path, "w"))
        print(out["why"])
        return
    dev = torch.device("cuda")
    model = AutoModelForCausalLM.from_pretrained(args.model, torch_dtype=torch.bfloat16).to(dev).eval()
    attn = getattr(model.config, "_attn_implementation", "?")
    out["engine"] = f"transformers {transformers.__version__}, torch {torch.__version__}, {attn} attention, no compile"
    out["device"] = torch.cuda.get_device_name(0)
    ids = read_ids(args.ids)
    sync = torch.cuda.synchronize

    def timed(fn):
        sync()
        t = time.perf_counter()
        r = fn()
        sync()
        return time.perf_counter() - t, r

    with torch.inference_mode():
        # Parity: logits of every position of the worker's sequence.
        x = torch.tensor([ids], device=dev)
        logits = model(x).logits[0].float().cpu().numpy()
        np.save(os.path.join(args.out, "torch_logits.npy"), logits)
        # Prefill: the first prompt_tokens ids in one forward pass (after a warm-up).
        p = torch.tensor([ids[: args.prompt_tokens]], device=dev)
        model(p)
        dt, _ = timed(lambda: model(p))
        out["prompt_tps"] = p.shape[1] / dt
        out["prompt_ttft_ms"] = dt * 1e3
        short = ids[:16]
        gen = lambda n, k: model.generate(torch.tensor([short] * n, device=dev), attention_mask=torch.ones(n, len(short), device=dev, dtype=torch.long),
                                          max_new_tokens=k, min_new_tokens=k, do_sample=False, pad_token_id=0)
        gen(1, 4)
        dt, _ = timed(lambda: gen(1, 1))
        out["short_ttft_ms"] = dt * 1e3
        rows = []
        for n in args.streams:
            gen(n, 2)  # warm-up at this batch size
            first, _ = timed(lambda: gen(n, 1))
            total, r = timed(lambda: gen(n, args.decode_tokens))
            assert r.shape[1] == len(short) + args.decode_tokens
            rate = n * (args.decode_tokens - 1) / max(total - first, 1e-9)
            rows.append({"streams": n, "aggregate_tps": rate, "per_stream_tps": rate / n})
        out["rows"] = rows
        out["device_memory_used_mb"] = torch.cuda.max_memory_allocated() // (1 << 20)
        # Copy bandwidth: read + write of 2 GiB.
        a = torch.empty(1 << 30, dtype=torch.bfloat16, device=dev)
        b = torch.empty_like(a)
        b.copy_(a)
        dt, _ = timed(lambda: [b.copy_(a) for _ in range(5)])
        out["copy_gbps"] = 5 * 2 * a.numel() * 2 / dt / 1e9
    out["ok"] = True
    json.dump(out, open(path, "w"), indent=1)
    print(f"transformers done on {out['device']}")


def load_json(path):
    try:
        return json.load(open(path))
    except (OSError, ValueError):
        return None


def fmt(v, unit="", nd=0):
    return "—" if v is None else f"{v:,.{nd}f}{unit}"


def table(args):
    run = args.out
    made = load_json(os.path.join(run, "model", "made.json")) or {}
    w = load_json(os.path.join(run, "worker_bench.json"))
    t = load_json(os.path.join(run, "torch.json")) or {"ok": False, "why": "transformers did not run"}
    tok = t if t.get("ok") else {}
    rows_w = {r["streams"]: r for r in (w or {}).get("rows", [])}
    rows_t = {r["streams"]: r for r in tok.get("rows", [])}

    # Parity, when both wrote logits.
    agree = max_dl = None
    n_pos = 0
    wl_path, tl_path = os.path.join(run, "worker_logits.bin"), os.path.join(run, "torch_logits.npy")
    if os.path.exists(wl_path) and os.path.exists(tl_path):
        tl = np.load(tl_path)
        wl = np.fromfile(wl_path, dtype="<f4").reshape(tl.shape)
        n_pos = tl.shape[0]
        agree = float((wl.argmax(1) == tl.argmax(1)).mean() * 100)
        max_dl = float(np.abs(wl - tl).max())

    weights_bytes = made.get("weights_bytes")
    peak, peak_from = None, None
    for name, gbps in PEAK_GBPS.items():
        if name in tok.get("device", ""):
            peak, peak_from = gbps, f"{name} data sheet"
    if peak is None and tok.get("copy_gbps"):
        peak, peak_from = tok["copy_gbps"], "measured copy bandwidth"

    def bw(rate):
        if rate is None or not weights_bytes or not peak:
            return "—"
        gbps = rate * weights_bytes / 1e9
        return f"{gbps:,.0f} GB/s = {100 * gbps / peak:.0f} % of {peak:,.0f} GB/s ({peak_from})"

    wname = f"worker ({w['device']}, {w['weights']})" if w else "worker (did not run)"
    tname = f"transformers ({tok.get('engine')})" if tok else f"transformers: not run — {t.get('why')}"
    print(f"model: Llama {made.get('size', '?')}, {made.get('params', 0) / 1e9:.2f} B parameters, bf16 weights, seed {made.get('seed')}")
    print(f"A: {wname}")
    print(f"B: {tname}")
    print()
    print("| metric | A: worker | B: transformers | A / B |")
    print("|---|---|---|---|")

    def row(name, a, b, unit="", nd=0):
        ratio = f"{a / b:.2f}×" if a and b else "—"
        print(f"| {name} | {fmt(a, unit, nd)} | {fmt(b, unit, nd)} | {ratio} |")

    row(f"prefill tok/s ({w['prompt_tokens'] if w else '?'}-token prompt)", w and w["prompt_tps"], tok.get("prompt_tps"))
    row("TTFT, 512-token prompt (ms)", w and w["prompt_ttft"], tok.get("prompt_ttft_ms"))
    row("TTFT, short prompt (ms)", w and w["short_ttft"], tok.get("short_ttft_ms"))
    for n in sorted(set(rows_w) | set(rows_t)):
        label = "decode tok/s, 1 stream" if n == 1 else f"decode tok/s, {n} streams (aggregate)"
        row(label, rows_w.get(n, {}).get("aggregate_tps"), rows_t.get(n, {}).get("aggregate_tps"))
    row("device memory in use (MiB)", w and w.get("device_memory_used_mb"), tok.get("device_memory_used_mb"))
    one_w, one_t = rows_w.get(1, {}).get("aggregate_tps"), rows_t.get(1, {}).get("aggregate_tps")
    print(f"| memory bandwidth used, 1 stream (weights read per token) | {bw(one_w)} | {bw(one_t)} | |")
    print(f"| argmax agreement over {n_pos} positions | {fmt(agree, ' %', 1)} | (reference) | |")
    print(f"| max abs logit difference | {fmt(max_dl, '', 3)} | (reference) | |")
    print()
    # The targets, for the 1B model on one H100.
    one = one_w or 0
    agg32 = rows_w.get(32, {}).get("aggregate_tps") or 0
    t32 = rows_t.get(32, {}).get("aggregate_tps")
    checks = [
        ("single-stream decode ≥ 300 tok/s", one >= 300),
        ("single-stream decode ≥ transformers", one_t is not None and one >= one_t),
        ("32 streams ≥ 3,000 tok/s", agg32 >= 3000),
        ("32 streams ≥ 2× transformers batched", t32 is not None and agg32 >= 2 * t32),
        ("argmax agreement ≥ 99 %", agree is not None and agree >= 99.0),
    ]
    for name, ok in checks:
        print(f"- target {name}: {'met' if ok else 'NOT met'}")


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make-model")
    m.add_argument("--size", choices=sorted(SIZES), default="1b")
    m.add_argument("--tokenizer", required=True)
    m.add_argument("--out", required=True)
    m.add_argument("--seed", type=int, default=0)
    t = sub.add_parser("torch")
    t.add_argument("--model", required=True)
    t.add_argument("--ids", required=True)
    t.add_argument("--out", required=True)
    t.add_argument("--prompt-tokens", type=int, default=512)
    t.add_argument("--decode-tokens", type=int, default=128)
    t.add_argument("--streams", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 32, 64])
    tb = sub.add_parser("table")
    tb.add_argument("--out", required=True)
    args = ap.parse_args()
    {"make-model": make_model, "torch": torch_run, "table": table}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
