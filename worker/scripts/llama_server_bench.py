"""Aggregate decode tok/s of a running llama.cpp `llama-server` at N concurrent streams.

The same load shape as `worker bench`: N streams with short, different prompts, 128
tokens each (end of sequence ignored), all submitted at once; aggregate = all
generated tokens / (last token - first token). Standard library only; traffic goes to
127.0.0.1 and is bounded (N requests per level).

    llama-server -m MODEL.gguf -t 2 -np 32 -c 16384 --port 8090 &
    python3 worker/scripts/llama_server_bench.py --port 8090 --streams 1,4,16,32
"""

import argparse
import http.client
import json
import threading
import time


def stream(port, prompt, tokens, out):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    body = {"prompt": prompt, "n_predict": tokens, "ignore_eos": True, "stream": True,
            "temperature": 0, "cache_prompt": False}
    start = time.perf_counter()
    conn.request("POST", "/completion", json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    first = last = None
    n = 0
    for raw in resp:
        line = raw.decode().strip()
        if not line.startswith("data: "):
            continue
        ev = json.loads(line[6:])
        if ev.get("content"):
            now = time.perf_counter()
            first = first or now
            last = now
            n += 1
        if ev.get("stop"):
            break
    out.append((start, first, last, n))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=8090)
    ap.add_argument("--streams", default="1,4,16,32")
    ap.add_argument("--tokens", type=int, default=128)
    a = ap.parse_args()
    print("| streams | aggregate decode tok/s | per-stream tok/s | mean TTFT |")
    print("|---|---|---|---|")
    for n in [int(s) for s in a.streams.split(",")]:
        out = []
        threads = [threading.Thread(target=stream, args=(a.port, f"Story {i}: once upon a time in city {i},", a.tokens, out))
                   for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        first = min(o[1] for o in out)
        last = max(o[2] for o in out)
        total = sum(o[3] for o in out)
        per = sum((o[3] - 1) / (o[2] - o[1]) for o in out if o[2] > o[1]) / n
        ttft = sum(o[1] - o[0] for o in out) / n
        print(f"| {n} | {total / (last - first):.0f} | {per:.1f} | {ttft * 1000:.0f} ms |")


if __name__ == "__main__":
    main()
