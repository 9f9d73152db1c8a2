#!/usr/bin/env python3
"""Runs the marketplace attacks of issue #19 against a gateway binary, from outside.

    cargo build --release -p gateway -p tests
    scripts/attack-check.py target/release/gateway [target/release/mock-provider]

Each attack runs against fresh gateways (SQLite in a temp dir, 127.0.0.1) with the
safeguard's config key set small where the attack needs it (an older build ignores the
keys it does not know), and prints one row: what a safe gateway answers, what this one
answered, and `safe` or `HOLE`. Exits 1 when any attack found a hole. Standard library
only; Redis on 127.0.0.1:6379 for the two-replica row. The in-process suite
(tests/tests/it/attacks.rs, bounds.rs) checks the same and more on every test run; this
script is for comparing builds (an old commit against today's).
"""

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

ADMIN = "attack-check-admin-key-0123456789"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(method, url, body=None, key=None, timeout=10):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("content-type", "application/json")
    if key:
        req.add_header("authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        try:
            return e.code, json.loads(e.read() or b"null")
        except ValueError:
            return e.code, None


class Gateway:
    def __init__(self, binary, workdir, env=None, db=None):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = open(os.path.join(workdir, f"gateway-{self.port}.log"), "w")
        db = db or os.path.join(workdir, f"gw-{self.port}.db")
        full = dict(os.environ)
        full.update({
            "GATEWAY_DATABASE_URL": f"sqlite://{db}",
            "GATEWAY_ADMIN_KEY": ADMIN,
            "GATEWAY_HOST": "127.0.0.1",
            "GPU_STREAMING_PORT": str(self.port),
            "GATEWAY_HEALTH_CHECK_SECS": "0",
        })
        full.update(env or {})
        self.proc = subprocess.Popen([binary, "serve"], env=full, stdout=subprocess.DEVNULL, stderr=self.log)
        for _ in range(200):
            try:
                if call("GET", f"{self.base}/health", timeout=1)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"gateway on {self.port} did not come up (see {self.log.name})")

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()

    def premium_key(self):
        status, v = call("POST", f"{self.base}/api/admin/keys", {"name": "attacker", "tier": "premium"}, ADMIN)
        assert status == 201, (status, v)
        call("POST", f"{self.base}/api/admin/users/{v['userId']}/credit", {"amount": 10}, ADMIN)
        return v["key"], v["id"]

    def free_key(self):
        status, v = call("POST", f"{self.base}/api/admin/keys", {"name": "free", "tier": "free"}, ADMIN)
        assert status == 201, (status, v)
        return v["key"]

    def provider(self, base_url, extra=None):
        body = {"capabilities": {"models": ["mock-model"], "maxConcurrentStreams": 8},
                "pricing": {"perToken": 0.000002}, "baseUrl": base_url}
        body.update(extra or {})
        status, v = call("POST", f"{self.base}/api/gpu/register", body)
        if status == 201:
            call("POST", f"{self.base}/api/gpu/stream/start",
                 {"providerId": v["providerId"], "model": "mock-model", "quality": "standard"}, v["providerKey"])
        return status, v


def registration_rows(binary, workdir):
    gw = Gateway(binary, workdir)
    rows = []
    try:
        for name, extra in [
            ("a provider asking $999 per token", {"pricing": {"perToken": 999}}),
            ("a provider claiming 4e9 concurrent streams",
             {"capabilities": {"models": ["mock-model"], "maxConcurrentStreams": 4_000_000_000}}),
        ]:
            status, _ = gw.provider("https://8.8.8.8", extra)
            rows.append((name, "400", str(status), status == 400))
        for url in ["http://169.254.169.254/latest/meta-data/?", "http://127.0.0.1:6379/", "http://[::1]:5432/",
                    "http://10.0.0.5:2375/", "https://[::ffff:127.0.0.1]/", "https://2130706433/", "http://user:pw@8.8.8.8/"]:
            status, _ = gw.provider(url)
            rows.append((f"a provider at `{url}`", "400", str(status), status == 400))
        status, _ = call("GET", f"{gw.base}/v1/models?api_key={gw.premium_key()[0]}")
        rows.append(("a key in the URL of a plain route", "401", str(status), status == 401))
    finally:
        gw.stop()
    return rows


def provider_rows(binary, mock, workdir):
    rows = []
    mock_port = free_port()
    mock_proc = subprocess.Popen([mock, "--port", str(mock_port), "--model", "mock-model"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    mock_url = f"http://127.0.0.1:{mock_port}"
    env = {"GATEWAY_ALLOW_PRIVATE_PROVIDERS": "true", "GATEWAY_FREE_TIER_DAILY_BUDGET": "0",
           "GATEWAY_PROBATION_REQUESTS": "0", "GATEWAY_BODY_READ_TIMEOUT_SECS": "1",
           "GATEWAY_MAX_CONNECTIONS_PER_IP": "4"}
    gw = Gateway(binary, workdir, env)
    try:
        gw.provider(mock_url)
        key, _ = gw.premium_key()
        status, v = call("POST", f"{gw.base}/v1/chat/completions",
                         {"model": "mock-model", "max_tokens": 5, "messages": [{"role": "user", "content": "[overrun] hi"}]}, key)
        billed = (v or {}).get("usage", {}).get("completion_tokens")
        rows.append(("a provider sending 101 tokens for `max_tokens: 5`", "≤ 5 billed", f"{status}, {billed} billed",
                     status == 200 and billed is not None and billed <= 5))
        status, v = call("POST", f"{gw.base}/v1/chat/completions",
                         {"model": "mock-model", "messages": [{"role": "user", "content": "hi"}]}, gw.free_key())
        rows.append(("a free key when the free-tier budget is 0", "429", str(status), status == 429))
        # A body trickled in: the head, then one byte, then nothing.
        s = socket.create_connection(("127.0.0.1", gw.port))
        s.sendall((f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
                   "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{").encode())
        s.settimeout(5)
        try:
            answer = s.recv(64).decode(errors="replace")
        except socket.timeout:
            answer = "(no answer in 5 s)"
        s.close()
        rows.append(("a body trickled in slower than 1 s", "408", answer.split("\r\n")[0][:40],
                     answer.startswith("HTTP/1.1 408")))
        time.sleep(0.3)
        held = [socket.create_connection(("127.0.0.1", gw.port)) for _ in range(4)]
        time.sleep(0.3)
        try:
            status, _ = call("GET", f"{gw.base}/health", timeout=3)
            got = str(status)
        except OSError as e:
            got, status = f"refused ({type(e).__name__})", None
        rows.append(("a 5th connection from one address (cap 4)", "refused", got, status is None))
        for h in held:
            h.close()
    finally:
        gw.stop()
        mock_proc.terminate()
    return rows


def replica_rows(binary, workdir):
    db = os.path.join(workdir, "shared.db")
    env = {"GATEWAY_REDIS_URL": "redis://127.0.0.1:6379", "GATEWAY_KEY_CACHE_TTL_SECS": "60"}
    one = Gateway(binary, workdir, env, db)
    two = Gateway(binary, workdir, env, db)
    try:
        key, key_id = one.premium_key()
        call("GET", f"{two.base}/v1/models", key=key)
        call("POST", f"{one.base}/api/admin/keys/{key_id}/revoke", {}, ADMIN)
        time.sleep(1)
        status, _ = call("GET", f"{two.base}/v1/models", key=key)
        return [("a key revoked on replica 1, used on replica 2 after 1 s", "401", str(status), status == 401)]
    finally:
        one.stop()
        two.stop()


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    binary = os.path.abspath(sys.argv[1])
    mock = os.path.abspath(sys.argv[2] if len(sys.argv) > 2 else os.path.join(os.path.dirname(binary), "mock-provider"))
    with tempfile.TemporaryDirectory() as workdir:
        rows = registration_rows(binary, workdir) + provider_rows(binary, mock, workdir) + replica_rows(binary, workdir)
    print(f"\n{binary}\n\n| attack | safe answer | this gateway | |\n|---|---|---|---|")
    for name, want, got, ok in rows:
        print(f"| {name} | {want} | {got} | {'safe' if ok else 'HOLE'} |")
    holes = sum(1 for r in rows if not r[3])
    print(f"\n{len(rows) - holes} of {len(rows)} attacks refused")
    sys.exit(1 if holes else 0)


if __name__ == "__main__":
    main()
