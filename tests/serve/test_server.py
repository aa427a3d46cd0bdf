"""`nextn serve`: a real server on 127.0.0.1, started and stopped by the tests, spoken to over HTTP."""

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

import pytest

import nextn

pytestmark = pytest.mark.slow

HOST = "127.0.0.1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class Server:
    """`nextn serve ARTIFACT ...` in a subprocess, on a free loopback port."""

    def __init__(self, artifact, *args):
        self.port = _free_port()
        cmd = [sys.executable, "-c", "from nextn.cli import main; main()", "serve", str(artifact),
               "--host", HOST, "--port", str(self.port), *args]  # fmt: skip
        self.log = tempfile.TemporaryFile("w+")  # not a pipe: a chatty server must never block on it
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, text=True, env=os.environ)
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.output()}")
            try:
                if self.get("/health")[0] == 200:
                    return
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError("server did not come up")

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def url(self, path: str) -> str:
        return f"http://{HOST}:{self.port}{path}"

    def get(self, path: str):
        with urllib.request.urlopen(self.url(path), timeout=30) as r:
            return r.status, r.read().decode()

    def post(self, body, path: str = "/v1/completions", timeout: float = 60):
        """-> status, headers, JSON body (errors included)."""
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        req = urllib.request.Request(self.url(path), data, {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, dict(r.headers), json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), json.loads(e.read())

    def stream(self, body):
        """An open streaming completion: -> (connection, iterator over its SSE data payloads)."""
        conn = http.client.HTTPConnection(HOST, self.port, timeout=60)
        conn.request("POST", "/v1/completions", json.dumps({**body, "stream": True}),
                     {"Content-Type": "application/json"})  # fmt: skip
        resp = conn.getresponse()
        assert resp.status == 200 and resp.getheader("content-type").startswith("text/event-stream")

        def events():
            for line in resp:
                line = line.decode().strip()
                if line.startswith("data: "):
                    yield line[len("data: ") :]

        return conn, events()

    def metric(self, name: str, **labels) -> float:
        """A sample's value from /metrics (0 when absent)."""
        _, text = self.get("/metrics")
        want = ",".join(f'{k}="{v}"' for k, v in labels.items())
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name + "{") or line.startswith(name + " "):
                head, value = line.rsplit(" ", 1)
                if all(f'{k}="{v}"' in head for k, v in labels.items()) or not want:
                    total += float(value)
        return total

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def server(tiny_artifact):
    s = Server(tiny_artifact, "--max-batch", "4", "--max-queue", "16", "--draft", "2", "--model-name", "tiny")
    yield s
    s.stop()
    assert s.proc.returncode == 0, s.output()


PROMPTS = ["w5 w6 w7", "w10 w11", "w12 w13 w14 w15 w16 w17", "w20", "w3 w1 w4 w1 w5", "w9 w2 w6"]


def _solo(artifact, prompts, **kw):
    with nextn.load(artifact) as model:
        return [model.generate(p, **kw) for p in prompts]


def _concurrently(fn, args):
    out = [None] * len(args)

    def work(i):
        out[i] = fn(args[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(args))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return out


def test_models_health_and_concurrent_requests_equal_solo_runs(server, tiny_artifact):
    assert server.get("/health")[0] == 200
    status, models = server.get("/v1/models")
    assert status == 200 and [m["id"] for m in json.loads(models)["data"]] == ["tiny"]

    # greedy, with the server's default draft (2) and with per-request draft settings, all in one batch
    drafts = [None, 0, "auto", 3, None, 1]
    bodies = [{"model": "tiny", "prompt": p, "max_tokens": 24, "temperature": 0, **({"draft": d} if d is not None else {})}
              for p, d in zip(PROMPTS, drafts)]  # fmt: skip
    got = _concurrently(server.post, bodies)
    greedy = _solo(tiny_artifact, PROMPTS, max_new_tokens=24, draft=0)
    for (status, _, body), w in zip(got, greedy):
        assert status == 200, body
        choice = body["choices"][0]
        assert choice["token_ids"] == w.token_ids and choice["text"] == w.text
        assert choice["finish_reason"] == ("stop" if len(w.token_ids) < 24 else "length")
        assert body["usage"]["completion_tokens"] == len(w.token_ids) and body["object"] == "text_completion"

    # sampled with a seed: each request draws what it draws alone, whatever shares its batch
    sampled = [{"prompt": p, "max_tokens": 12, "temperature": 0.9, "top_p": 0.9, "seed": 7} for p in PROMPTS[:4]]
    got = _concurrently(server.post, sampled)
    want = _solo(tiny_artifact, PROMPTS[:4], max_new_tokens=12, draft=2, temperature=0.9, top_p=0.9, seed=7)
    assert [b["choices"][0]["token_ids"] for _, _, b in got] == [w.token_ids for w in want]

    # token ids in, the same tokens out
    ids = [int(w[1:]) for w in PROMPTS[0].split()]
    status, _, body = server.post({"prompt": ids, "max_tokens": 24, "temperature": 0})
    assert status == 200 and body["choices"][0]["token_ids"] == greedy[0].token_ids


def test_streaming_equals_non_streaming(server):
    body = {"prompt": PROMPTS[2], "max_tokens": 20, "temperature": 0, "stream_options": {"include_usage": True}}
    _, _, whole = server.post(body)
    conn, events = server.stream(body)
    payloads = list(events)
    conn.close()
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    usage = chunks.pop()  # include_usage: a last chunk with no choices
    assert usage["choices"] == [] and usage["usage"] == whole["usage"]
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["choices"][0]["text"]
    assert [t for c in chunks for t in c["choices"][0]["token_ids"]] == whole["choices"][0]["token_ids"]
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == whole["choices"][0]["finish_reason"]
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1]) and len(chunks) > 2


@pytest.mark.parametrize("body,status,param,message", [
    ({"max_tokens": 4}, 400, "prompt", "prompt: this field is required"),
    ({"prompt": "w1", "max_tokens": "4"}, 400, "max_tokens", "max_tokens"),
    ({"prompt": "w1", "max_tokens": 0}, 400, "max_tokens", "max_tokens 0: must be >= 1"),
    ({"prompt": "w1", "temperature": -1}, 400, "temperature", "temperature -1"),
    ({"prompt": "w1", "top_p": 0}, 400, "top_p", "top_p 0"),
    ({"prompt": "w1", "top_k": -5}, 400, "top_k", "top_k -5"),
    ({"prompt": "w1", "n": 2}, 400, "n", "n 2"),
    ({"prompt": "w1", "stream": "yes"}, 400, "stream", "stream"),
    ({"prompt": "w1", "draft": "many"}, 400, "draft", "draft 'many'"),
    ({"prompt": "w1", "draft": -2}, 400, "draft", "draft -2"),
    ({"prompt": [3, 999]}, 400, "prompt", "999 is outside the vocabulary"),
    ({"prompt": []}, 400, "prompt", "empty prompt"),
    ({"prompt": "w1 " * 1100}, 400, "prompt", "prompt of 1100 tokens does not fit the context of 1024"),
    ({"prompt": "w1", "model": "gpt-4"}, 404, "model", "model 'gpt-4' does not exist"),
    (b"{not json", 400, None, "not valid JSON"),
    (b"[1, 2]", 400, None, "must be a JSON object"),
])  # fmt: skip
def test_bad_requests_get_openai_errors_naming_the_field(server, body, status, param, message):
    got, _, err = server.post(body)
    assert got == status, err
    e = err["error"]
    assert message in e["message"] and e["param"] == param and e["type"], e
    assert "\n" not in e["message"] and "Traceback" not in e["message"]
    assert server.get("/health")[0] == 200  # and the server goes on


def test_metrics_counters_move(server):
    before = {n: server.metric(n) for n in ("nextn:generation_tokens_total", "nextn:spec_decode_num_draft_tokens_total",
                                            "nextn:time_to_first_token_seconds_count",
                                            "nextn:request_success_total")}  # fmt: skip
    _, _, body = server.post({"prompt": PROMPTS[0], "max_tokens": 16, "temperature": 0, "draft": 2})
    n = body["usage"]["completion_tokens"]
    assert server.metric("nextn:generation_tokens_total") == before["nextn:generation_tokens_total"] + n
    assert server.metric("nextn:spec_decode_num_draft_tokens_total") > before["nextn:spec_decode_num_draft_tokens_total"]
    assert server.metric("nextn:time_to_first_token_seconds_count") == before["nextn:time_to_first_token_seconds_count"] + 1
    assert server.metric("nextn:request_success_total") == before["nextn:request_success_total"] + 1
    assert server.metric("nextn:spec_decode_num_accepted_tokens_per_pos_total") >= 0
    assert server.metric("nextn:http_requests_total", route="/v1/completions", status="200") >= 1
    _, text = server.get("/metrics")
    for name in ("nextn:num_requests_running", "nextn:num_requests_waiting", "nextn:inter_token_latency_seconds_bucket",
                 "nextn:spec_decode_num_drafts_total", "nextn:spec_decode_num_accepted_tokens_total",
                 "nextn:prompt_tokens_total", "nextn:e2e_request_latency_seconds_count"):  # fmt: skip
        assert name in text


def test_full_queue_is_refused_and_a_disconnect_frees_its_slot(tiny_artifact):
    """One batch slot, no queue: a second request is refused while a long stream runs; once that client
    goes away, its slot is free at the next step."""
    with nextn.load(tiny_artifact) as model:  # a prompt whose greedy continuation runs 1000 tokens without EOS
        prompt = next(p for p in (f"w{i}" for i in range(2, 40))
                      if model.generate(p, max_new_tokens=1000, draft=0).stats["new_tokens"] == 1000)  # fmt: skip
    s = Server(tiny_artifact, "--max-batch", "1", "--max-queue", "0", "--draft", "0")
    try:
        long = {"prompt": prompt, "max_tokens": 1000, "temperature": 0}
        conn, events = s.stream(long)
        next(events)  # the long request is decoding
        status, headers, err = s.post({"prompt": "w4", "max_tokens": 4})
        assert status == 429 and headers.get("retry-after") == "1" and "queue is full" in err["error"]["message"]
        conn.close()  # the client goes away mid-stream
        deadline = time.time() + 30
        while s.metric("nextn:request_success_total", finished_reason="cancelled") < 1 and time.time() < deadline:
            time.sleep(0.05)
        assert s.metric("nextn:request_success_total", finished_reason="cancelled") == 1
        assert s.metric("nextn:generation_tokens_total") < 1000  # stopped, not run to its end
        status, _, body = s.post({"prompt": "w4", "max_tokens": 4, "temperature": 0})
        assert status == 200 and body["choices"][0]["token_ids"]
    finally:
        s.stop()


def test_serve_flags_and_a_taken_port_fail_in_one_line(tiny_artifact):
    with socket.socket() as taken:
        taken.bind((HOST, 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        for args, message in [
            (["--port", str(port)], f"--port {port}: cannot listen there"),
            (["--max-batch", "0"], "--max-batch 0: must be >= 1"),
            (["--prefill-chunk", "0"], "--prefill-chunk 0: must be >= 1"),
            (["--draft", "x"], "--draft 'x'"),
        ]:
            r = subprocess.run([sys.executable, "-c", "from nextn.cli import main; main()", "serve", str(tiny_artifact),
                                "--host", HOST, *args], capture_output=True, text=True, timeout=120)  # fmt: skip
            assert r.returncode == 1 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
            assert len(r.stderr.strip().splitlines()) == 1


def test_two_replicas_on_a_local_ray_instance(tiny_artifact):
    """`nextn serve --replicas 2`: a local Ray instance, Ray Serve's proxy on 127.0.0.1, two engines."""
    pytest.importorskip("ray.serve")
    s = Server(tiny_artifact, "--replicas", "2", "--draft", "2", "--max-batch", "4")
    try:
        replicas, deadline = set(), time.time() + 60
        while len(replicas) < 2 and time.time() < deadline:  # requests are spread over both
            replicas.add(json.loads(s.get("/health")[1])["replica"])
        assert len(replicas) == 2
        bodies = [{"prompt": p, "max_tokens": 16, "temperature": 0} for p in PROMPTS * 2]
        got = _concurrently(s.post, bodies)
        want = _solo(tiny_artifact, PROMPTS, max_new_tokens=16, draft=0)
        assert [b["choices"][0]["token_ids"] for _, _, b in got] == [w.token_ids for w in want * 2]
        status, _, err = s.post({"prompt": "w1", "temperature": -1})
        assert status == 400 and err["error"]["param"] == "temperature"
    finally:
        s.stop()
    assert s.proc.returncode == 0, s.output()[-2000:]
