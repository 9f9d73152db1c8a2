"""Writes a Hugging Face model directory from a Llama GGUF (tests only).

    python gguf_to_hf.py MODEL.gguf OUT_DIR
    python gguf_to_hf.py --tokenizer-only MODEL.gguf OUT_DIR

config.json, model.safetensors (float32, the dequantized weights with q/k in Hugging
Face's rotate-half layout, i.e. llama.cpp's conversion permutation undone),
tokenizer.json (byte-level BPE with the GGUF's vocabulary and merges; SmolLM's
pre-tokenizer) and tokenizer_config.json (the chat template). With --tokenizer-only,
just the two tokenizer files (worker/scripts/gpu-check.sh builds its model around them).
"""
import json
import os
import struct
import sys

import numpy as np

from llama_ref import load


def unpermute(w, heads):
    # Inverse of convert_hf_to_gguf.py's LlamaModel.permute.
    out_dim = w.shape[0]
    return w.reshape(heads, out_dim // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def main():
    args = sys.argv[1:]
    tokenizer_only = "--tokenizer-only" in args
    path, out = [a for a in args if a != "--tokenizer-only"]
    os.makedirs(out, exist_ok=True)
    meta, t = load(path)
    write_tokenizer(meta, out)
    if not tokenizer_only:
        write_model(meta, t, out)


def write_model(meta, t, out):
    a = meta["general.architecture"]
    n_layers = meta[f"{a}.block_count"]
    heads, kv = meta[f"{a}.attention.head_count"], meta[f"{a}.attention.head_count_kv"]
    tensors = {"model.embed_tokens.weight": t["token_embd.weight"], "model.norm.weight": t["output_norm.weight"]}
    for l in range(n_layers):
        p, q = f"blk.{l}.", f"model.layers.{l}."
        tensors[q + "input_layernorm.weight"] = t[p + "attn_norm.weight"]
        tensors[q + "self_attn.q_proj.weight"] = unpermute(t[p + "attn_q.weight"], heads)
        tensors[q + "self_attn.k_proj.weight"] = unpermute(t[p + "attn_k.weight"], kv)
        tensors[q + "self_attn.v_proj.weight"] = t[p + "attn_v.weight"]
        tensors[q + "self_attn.o_proj.weight"] = t[p + "attn_output.weight"]
        tensors[q + "post_attention_layernorm.weight"] = t[p + "ffn_norm.weight"]
        tensors[q + "mlp.gate_proj.weight"] = t[p + "ffn_gate.weight"]
        tensors[q + "mlp.up_proj.weight"] = t[p + "ffn_up.weight"]
        tensors[q + "mlp.down_proj.weight"] = t[p + "ffn_down.weight"]
    header, blobs, off = {}, [], 0
    for name, arr in tensors.items():
        b = np.ascontiguousarray(arr, dtype="<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(arr.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(os.path.join(out, "model.safetensors"), "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)
    config = {
        "model_type": "llama", "hidden_size": meta[f"{a}.embedding_length"], "num_attention_heads": heads,
        "num_key_value_heads": kv, "num_hidden_layers": n_layers,
        "intermediate_size": meta[f"{a}.feed_forward_length"],
        "max_position_embeddings": meta[f"{a}.context_length"], "rope_theta": meta[f"{a}.rope.freq_base"],
        "rms_norm_eps": meta[f"{a}.attention.layer_norm_rms_epsilon"], "tie_word_embeddings": True,
        "vocab_size": len(meta["tokenizer.ggml.tokens"]), "eos_token_id": meta["tokenizer.ggml.eos_token_id"],
    }
    json.dump(config, open(os.path.join(out, "config.json"), "w"))


def write_tokenizer(meta, out):
    toks, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    tokenizer = {
        "added_tokens": [{"id": i, "content": s, "special": True} for i, s in enumerate(toks) if types[i] == 3],
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": True},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]},
        "decoder": {"type": "ByteLevel"},
        "model": {"type": "BPE", "vocab": {s: i for i, s in enumerate(toks)}, "merges": meta["tokenizer.ggml.merges"]},
    }
    json.dump(tokenizer, open(os.path.join(out, "tokenizer.json"), "w"))
    tok_cfg = {"chat_template": meta["tokenizer.chat_template"], "bos_token": toks[meta["tokenizer.ggml.bos_token_id"]],
               "eos_token": toks[meta["tokenizer.ggml.eos_token_id"]], "add_bos_token": False}
    json.dump(tok_cfg, open(os.path.join(out, "tokenizer_config.json"), "w"))


if __name__ == "__main__":
    main()
