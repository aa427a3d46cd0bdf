"""Load on `nextn serve` over loopback: throughput, time to first token and inter-token latency at several
concurrencies, drafting auto and off; or a bounded soak.

    python benchmarks/serve_load.py [ARTIFACT] [--concurrency 1,4,16,64] [--rounds 3] [--max-tokens 64]
    python benchmarks/serve_load.py [ARTIFACT] --soak 600 [--concurrency 16]

It starts one server (`nextn serve ARTIFACT --max-batch 64 --draft auto`, a free port on 127.0.0.1) and
stops it at the end. Each request streams (SSE) a held-out stdlib prompt (64 tokens) with greedy decoding
and ignore_eos, so every request produces max_tokens tokens; drafting is chosen per request ("auto" or
0). In a round every (concurrency, draft) cell runs once, in a rotated order (this VM drifts 10-30%);
figures are medians over rounds. Throughput = completion tokens / wall time of the cell; TTFT from
sending a request to its first token; ITL = gap between two chunks / tokens in the later chunk (a chunk
of drafted tokens arrives at once). The throughput ratio of concurrency C to concurrency 1 is paired
per round.

Soak: concurrency clients send requests back to back for --soak seconds (and at most 50 x that many
requests); prints failures, lost requests and the server's RSS (VmRSS) after a warm-up of a tenth of
the time against the end.
"""

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import nextn
from nextn.bench.latency import load_prompts
from nextn.embedded import embedded_artifact

HOST = "127.0.0.1"


def start_server(artifact: str, max_batch: int) -> tuple[subprocess.Popen, int]:
    with socket.socket() as s:
        s.bind((HOST, 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-c", "from nextn.cli import main; main()", "serve", artifact, "--host", HOST,
           "--port", str(port), "--max-batch", str(max_batch), "--max-queue", "1024", "--draft", "auto"]  # fmt: skip
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:  # the server says when it answers
        if "serving" in line:
            threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()  # keep the pipe drained
            return proc, port
    raise RuntimeError(f"server exited with {proc.wait()}")


def one_request(port: int, prompt: list[int], max_tokens: int, draft) -> dict:
    """Stream one completion; -> timings (seconds) and token counts."""
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection(HOST, port, timeout=600)
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "draft": draft}  # fmt: skip
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        return {"error": resp.status}
    times, counts = [], []
    for line in resp:
        line = line.strip()
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            continue
        n = len(json.loads(line[6:])["choices"][0]["token_ids"])
        if n:
            times.append(time.perf_counter())
            counts.append(n)
    conn.close()
    itl = [(b - a) / n for a, b, n in zip(times, times[1:], counts[1:]) for _ in range(n)]
    return {"ttft": times[0] - t0, "itl": itl, "tokens": sum(counts), "end": times[-1] - t0}


def run_cell(port: int, prompts: list[list[int]], concurrency: int, n_requests: int, max_tokens: int, draft) -> dict:
    """n_requests requests, `concurrency` in flight at a time."""
    results: list[dict] = []
    lock = threading.Lock()
    todo = list(range(n_requests))

    def client():
        while True:
            with lock:
                if not todo:
                    return
                i = todo.pop()
            r = one_request(port, prompts[i % len(prompts)], max_tokens, draft)
            with lock:
                results.append(r)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ok = [r for r in results if "error" not in r]
    itl = [x for r in ok for x in r["itl"]]
    return {"throughput": sum(r["tokens"] for r in ok) / wall, "errors": len(results) - len(ok),
            "ttft": [r["ttft"] for r in ok], "itl": itl}  # fmt: skip


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def load(port: int, prompts, args) -> None:
    concs = [int(c) for c in args.concurrency.split(",")]
    drafts = ["auto", 0]
    cells = [(c, d) for c in concs for d in drafts]
    runs: dict = {cell: [] for cell in cells}
    for c in concs:  # warm-up: every batch size once
        run_cell(port, prompts, c, c, 8, "auto")
    for r in range(args.rounds):
        for cell in cells[r % len(cells) :] + cells[: r % len(cells)]:
            c, d = cell
            runs[cell].append(run_cell(port, prompts, c, max(args.min_requests, 2 * c), args.max_tokens, d))
    print(f"max_tokens {args.max_tokens}, prompts of {len(prompts[0])} tokens, greedy, {args.rounds} rounds; "
          "medians over rounds (p50/p99 over all requests of a cell)")  # fmt: skip
    print(f"{'conc':>4} {'draft':>5} {'tok/s':>8} {'vs conc 1':>10} {'TTFT p50':>9} {'TTFT p99':>9} "
          f"{'ITL p50':>8} {'ITL p99':>8} {'errors':>6}")  # fmt: skip
    for c, d in cells:
        rs = runs[c, d]
        ratio = statistics.median(x["throughput"] / y["throughput"] for x, y in zip(rs, runs[concs[0], d]))
        ttft = [t for x in rs for t in x["ttft"]]
        itl = [t for x in rs for t in x["itl"]]
        print(f"{c:>4} {d!s:>5} {statistics.median(x['throughput'] for x in rs):8.1f} {ratio:9.2f}x "
              f"{pct(ttft, .5) * 1e3:7.1f}ms {pct(ttft, .99) * 1e3:7.1f}ms {pct(itl, .5) * 1e3:6.2f}ms "
              f"{pct(itl, .99) * 1e3:6.2f}ms {sum(x['errors'] for x in rs):>6}")  # fmt: skip


def soak(proc, port: int, prompts, args) -> None:
    c = int(args.concurrency.split(",")[-1])
    end, warm = time.time() + args.soak, time.time() + args.soak / 10
    limit = 50 * int(args.soak)
    sent, done, failed, lock = [0], [0], [0], threading.Lock()
    samples: list[tuple[float, float]] = []

    def client(i):
        while time.time() < end:
            with lock:
                if sent[0] >= limit:
                    return
                sent[0] += 1
            try:
                r = one_request(port, prompts[(i + sent[0]) % len(prompts)], args.max_tokens, "auto")
                ok = "error" not in r and r["tokens"] == args.max_tokens
            except OSError:
                ok = False
            with lock:
                done[0] += ok
                failed[0] += not ok

    threads = [threading.Thread(target=client, args=(i,)) for i in range(c)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        samples.append((time.time(), rss_mb(proc.pid)))
        time.sleep(5)
    after_warm = [m for t, m in samples if t >= warm]
    print(f"soak: {args.soak:.0f} s at concurrency {c}: {sent[0]} requests sent, {done[0]} complete, {failed[0]} failed, "
          f"{sent[0] - done[0] - failed[0]} lost")  # fmt: skip
    print(f"server RSS: {after_warm[0]:.0f} MB after warm-up, max {max(after_warm):.0f} MB, end {after_warm[-1]:.0f} MB "
          f"({(after_warm[-1] / after_warm[0] - 1) * 100:+.1f}%)")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("artifact", nargs="?")
    ap.add_argument("--concurrency", default="1,4,16,64")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--min-requests", type=int, default=16)
    ap.add_argument("--soak", type=float, default=0.0, help="seconds of soak instead of the load table")
    args = ap.parse_args()
    artifact = args.artifact or str(embedded_artifact())
    with nextn.load(artifact) as model:
        prompts = load_prompts(None, model.tokenizer, model.engines.manifest["config"]["vocab_size"], 64, 32)
    max_batch = max(int(c) for c in args.concurrency.split(","))
    proc, port = start_server(artifact, max_batch)
    print(f"server pid {proc.pid} on {HOST}:{port}, max batch {max_batch}; {os.cpu_count()} CPUs")
    try:
        soak(proc, port, prompts, args) if args.soak else load(port, prompts, args)
    finally:
        proc.terminate()
        proc.wait(30)


if __name__ == "__main__":
    main()
