"""`tokenmill route` benchmarks: prefix affinity vs round robin, and the router's own overhead.

prefix-affinity: 2 `tokenmill serve` replicas behind the router; a prefix-repetition workload (chat requests whose
system message is one of --num-prefixes documents of --prefix-tokens tokens, each asked --rounds different
questions, in a shuffled order, --concurrency at a time) is run once with `balancing: round_robin` and once with
`balancing: prefix`, each time with fresh documents. Reported per policy: the backends' prefix-cache hit rate
(vllm:prefix_cache_hits / vllm:prefix_cache_queries, summed over both replicas) and the mean TTFT seen by the
client through the router. Each replica's KV cache is sized by --kv-cache-memory: by default it holds about
4.5 of the 8 documents, as in a deployment whose documents fill more than one replica's cache.

overhead: the same requests sent straight to a backend and through the router, interleaved (the order within a
pair alternates) on warm keep-alive connections. Non-streaming, first against a stub backend that answers at once
(so the router's own cost is not lost in the model's noise: the target's measurement), then against one
`tokenmill serve` replica (max_tokens 1): router p50 minus direct p50, and the router process's CPU time per
request. Streaming: output tokens per second of long streams (ignore_eos) from the replica through the router as
a share of direct.

    python benchmarks/router_bench.py prefix-affinity          # bundled SmolLM2-135M
    python benchmarks/router_bench.py overhead
    python benchmarks/router_bench.py all --json

Targets: hit rate >= 1.8x round robin's and mean TTFT >= 2x lower; added p50 < 2 ms; streaming >= 95% of direct.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

WORDS = ("engine", "batch", "token", "cache", "block", "prefix", "stream", "server", "model", "request", "queue",
         "latency", "throughput", "kernel", "memory", "scheduler", "replica", "router", "tier", "price")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    def __init__(self, cmd: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.log_path = log
        self._log = open(log, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                     env=dict(os.environ, PYTHONUNBUFFERED="1", **(env or {})))

    def wait_ready(self, url: str, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.proc.args[:5]} exited:\n{self.log_path.read_text()[-3000:]}")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"not ready after {timeout} s: {self.log_path}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


# ---- a stub OpenAI backend: answers at once, so the router's own cost is not lost in the model's noise ----------
STUB_COMPLETION = json.dumps({
    "id": "cmpl-stub", "object": "text_completion", "created": 0, "model": "stub-model",
    "choices": [{"index": 0, "text": " stub", "logprobs": None, "finish_reason": "length"}],
    "usage": {"prompt_tokens": 4, "completion_tokens": 1, "total_tokens": 5}}).encode()


async def stub_backend_app(scope: dict, receive, send) -> None:
    """A minimal ASGI app with the OpenAI shape: GET /health, POST /v1/completions (non-streaming), nothing else."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    more = True
    while more:  # read (and drop) the request body
        message = await receive()
        more = message.get("more_body", False)
    if scope["path"] == "/health":
        status, body = 200, b"{}"
    elif scope["path"] == "/v1/completions":
        status, body = 200, STUB_COMPLETION
    else:
        status, body = 404, b'{"error": {"message": "not found"}}'
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def start_stub_backend(workdir: Path) -> tuple[Proc, str]:
    port = free_port()
    proc = Proc([sys.executable, os.path.abspath(__file__), "stub-backend", "--port", str(port)],
                workdir / "stub-backend.log")
    url = f"http://127.0.0.1:{port}"
    proc.wait_ready(url)
    return proc, url


def start_replica(args: argparse.Namespace, workdir: Path, name: str) -> tuple[Proc, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "tokenmill.entrypoints.cli", "serve", *([args.model] if args.model else []),
           "--host", "127.0.0.1", "--port", str(port), "--kv-cache-memory", args.kv_cache_memory,
           "--max-model-len", str(args.max_model_len), "--log-stats-interval", "0", "--disable-uvicorn-access-log",
           "--served-model-name", "bench-model"]
    proc = Proc(cmd, workdir / f"{name}.log", env={"OMP_NUM_THREADS": str(args.threads_per_replica)})
    return proc, f"http://127.0.0.1:{port}"


def start_router(urls: list[str], policy: str, workdir: Path, name: str,
                 stub_url: str | None = None) -> tuple[Proc, str]:
    """A router over one pool of replicas (and, with stub_url, a second backend serving model "stub-model")."""
    port = free_port()
    config: dict = {"backends": {"pool": {"urls": [u + "/v1" for u in urls], "model": "bench-model"}},
                    "routes": [{"name": "all", "match": {"model": "*"}, "backend": "pool"}],
                    "balancing": {"policy": policy}, "health": {"interval_s": 5.0}}
    if stub_url is not None:
        config["backends"]["stub"] = {"urls": [stub_url + "/v1"], "model": "stub-model"}
        config["routes"].insert(0, {"name": "stub", "match": {"model": "stub-model"}, "backend": "stub"})
    path = workdir / f"{name}.json"
    path.write_text(json.dumps(config))
    cmd = [sys.executable, "-m", "tokenmill.entrypoints.cli", "route", "--config", str(path), "--host", "127.0.0.1",
           "--port", str(port)]
    proc = Proc(cmd, workdir / f"{name}.log")
    url = f"http://127.0.0.1:{port}"
    proc.wait_ready(url)
    return proc, url


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (Linux /proc): the router's own cost, whatever the machine's load."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def prefix_cache_counters(url: str) -> tuple[float, float]:
    from prometheus_client.parser import text_string_to_metric_families

    queries = hits = 0.0
    for family in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=10).text):
        for sample in family.samples:
            if sample.name == "vllm:prefix_cache_queries_total":
                queries += sample.value
            elif sample.name == "vllm:prefix_cache_hits_total":
                hits += sample.value
    return queries, hits


def make_documents(replica_url: str, num: int, num_tokens: int, seed: int) -> list[str]:
    """num documents of exactly num_tokens tokens (cut by the server's tokenizer), distinct from the first word."""
    rng = random.Random(seed)
    docs = []
    for i in range(num):
        text = f"Document {seed}-{i}. " + " ".join(rng.choice(WORDS) + str(rng.randrange(1000))
                                                 for _ in range(num_tokens))
        ids = httpx.post(replica_url + "/tokenize", json={"prompt": text, "add_special_tokens": False},
                         timeout=60).json()["tokens"][:num_tokens]
        docs.append(httpx.post(replica_url + "/detokenize", json={"tokens": ids}, timeout=60).json()["prompt"])
    return docs


async def stream_ttft(client: httpx.AsyncClient, url: str, body: dict) -> tuple[float, int]:
    """(seconds to the first chunk with text, number of chunks with text)."""
    start = time.perf_counter()
    ttft = None
    num_chunks = 0
    async with client.stream("POST", url + "/v1/chat/completions" if "messages" in body else url + "/v1/completions",
                             json=body, timeout=600) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            data = json.loads(line[6:])
            if "error" in data:
                raise RuntimeError(data["error"])
            # The first token: a chat stream's first event carries only the role, before any prefill.
            if any((c.get("delta") or {}).get("content") or c.get("text") for c in data.get("choices") or []):
                if ttft is None:
                    ttft = time.perf_counter() - start
                num_chunks += 1
    return (ttft if ttft is not None else time.perf_counter() - start), num_chunks


def run_prefix_policy(args: argparse.Namespace, replica_urls: list[str], policy: str, seed: int,
                      workdir: Path) -> dict:
    docs = make_documents(replica_urls[0], args.num_prefixes, args.prefix_tokens, seed)
    router, router_url = start_router(replica_urls, policy, workdir, f"router-{policy}")
    try:
        before = [prefix_cache_counters(u) for u in replica_urls]
        rng = random.Random(seed)
        order = []
        for round_index in range(args.rounds):
            batch = list(range(args.num_prefixes))
            rng.shuffle(batch)
            order += [(d, round_index) for d in batch]
        ttfts: list[float] = []

        async def run() -> None:
            semaphore = asyncio.Semaphore(args.concurrency)
            async with httpx.AsyncClient() as client:
                async def one(doc_index: int, round_index: int) -> None:
                    body = {"model": "bench-model", "max_tokens": 4, "temperature": 0.0, "stream": True,
                            "messages": [{"role": "system", "content": docs[doc_index]},
                                         {"role": "user", "content": f"Question {round_index}: what is "
                                                                     f"{WORDS[round_index % len(WORDS)]}?"}]}
                    async with semaphore:
                        ttft, _ = await stream_ttft(client, router_url, body)
                        ttfts.append(ttft)

                await asyncio.gather(*(one(d, r) for d, r in order))

        start = time.perf_counter()
        asyncio.run(run())
        elapsed = time.perf_counter() - start
        after = [prefix_cache_counters(u) for u in replica_urls]
    finally:
        router.stop()
    queries = sum(a[0] - b[0] for a, b in zip(after, before))
    hits = sum(a[1] - b[1] for a, b in zip(after, before))
    return {"policy": policy, "requests": len(ttfts), "prefix_cache_queries": queries, "prefix_cache_hits": hits,
            "hit_rate": hits / queries if queries else 0.0, "mean_ttft_s": statistics.mean(ttfts),
            "p50_ttft_s": statistics.median(ttfts), "elapsed_s": elapsed}


def bench_prefix_affinity(args: argparse.Namespace, workdir: Path) -> dict:
    replicas = [start_replica(args, workdir, f"replica{i}") for i in range(2)]
    try:
        for proc, url in replicas:
            proc.wait_ready(url)
        urls = [url for _, url in replicas]
        results = [run_prefix_policy(args, urls, policy, seed, workdir)
                   for seed, policy in ((1, "round_robin"), (2, "prefix"))]
    finally:
        for proc, _ in replicas:
            proc.stop()
    rr, prefix = results
    return {
        "workload": {"replicas": 2, "num_prefixes": args.num_prefixes, "prefix_tokens": args.prefix_tokens,
                     "rounds": args.rounds, "concurrency": args.concurrency, "kv_cache_memory": args.kv_cache_memory,
                     "model": args.model or "HuggingFaceTB/SmolLM2-135M-Instruct (bundled GGUF)"},
        "round_robin": rr, "prefix": prefix,
        "hit_rate_ratio": prefix["hit_rate"] / rr["hit_rate"] if rr["hit_rate"] else float("inf"),
        "ttft_ratio": rr["mean_ttft_s"] / prefix["mean_ttft_s"],
    }


def paired_latencies(client: httpx.Client, direct_url: str, router_url: str, body: dict, num: int,
                     warmup: int = 20) -> tuple[list[float], list[float]]:
    """num (direct, routed) latencies of the same request, on warm keep-alive connections, interleaved (the order
    within a pair alternates, so neither side always runs right after the other)."""
    for _ in range(warmup):
        for target in (direct_url, router_url):
            client.post(target + "/v1/completions", json=body).raise_for_status()
    direct, routed = [], []
    for i in range(num):
        times = {}
        for target in ((direct_url, router_url) if i % 2 == 0 else (router_url, direct_url)):
            start = time.perf_counter()
            client.post(target + "/v1/completions", json=body).raise_for_status()
            times[target] = time.perf_counter() - start
        direct.append(times[direct_url])
        routed.append(times[router_url])
    return direct, routed


def latency_summary(direct: list[float], routed: list[float], router_cpu_s: float | None = None) -> dict:
    p50_direct, p50_routed = statistics.median(direct), statistics.median(routed)
    out = {"requests": len(direct), "p50_direct_ms": 1e3 * p50_direct, "p50_routed_ms": 1e3 * p50_routed,
           "p50_added_ms": 1e3 * (p50_routed - p50_direct),
           "median_paired_added_ms": 1e3 * statistics.median(r - d for d, r in zip(direct, routed))}
    if router_cpu_s is not None:
        out["router_cpu_ms_per_request"] = 1e3 * router_cpu_s / len(direct)
    return out


def bench_overhead(args: argparse.Namespace, workdir: Path) -> dict:
    stub, stub_url = start_stub_backend(workdir)
    proc, url = start_replica(args, workdir, "overhead-replica")
    router = None
    try:
        proc.wait_ready(url)
        router, router_url = start_router([url], "prefix", workdir, "router-overhead", stub_url=stub_url)
        client = httpx.Client(timeout=600)
        # Non-streaming against the stub backend: the added latency is the router's alone.
        body = {"model": "stub-model", "prompt": "The router adds", "max_tokens": 1, "temperature": 0.0}
        cpu_before = process_cpu_seconds(router.proc.pid)
        direct, routed = paired_latencies(client, stub_url, router_url, body, args.num_stub_requests, warmup=50)
        stub_result = latency_summary(direct, routed, process_cpu_seconds(router.proc.pid) - cpu_before)
        # The same against the model: the router's share of a real (tiny) request.
        body = {"model": "bench-model", "prompt": "The router adds", "max_tokens": 1, "temperature": 0.0}
        direct, routed = paired_latencies(client, url, router_url, body, args.num_requests, warmup=5)
        model_result = latency_summary(direct, routed)

        async def streams(target: str) -> tuple[float, int]:
            async with httpx.AsyncClient() as aclient:
                start = time.perf_counter()
                _, num_chunks = await stream_ttft(aclient, target, {
                    "model": "bench-model", "prompt": "Streaming through the router", "max_tokens": args.stream_tokens,
                    "temperature": 0.0, "stream": True, "ignore_eos": True})
                return time.perf_counter() - start, num_chunks

        stream_direct, stream_routed = [], []
        for i in range(args.num_streams):
            pair = ((url, stream_direct), (router_url, stream_routed))
            for target, out in (pair if i % 2 == 0 else pair[::-1]):
                seconds, num_chunks = asyncio.run(streams(target))
                out.append(num_chunks / seconds)
    finally:
        if router is not None:
            router.stop()
        proc.stop()
        stub.stop()
    return {
        "non_streaming_stub": stub_result,
        "non_streaming": model_result,
        "streaming": {"streams": args.num_streams, "max_tokens": args.stream_tokens,
                      "direct_tokens_per_s": statistics.median(stream_direct),
                      "routed_tokens_per_s": statistics.median(stream_routed),
                      "ratio": statistics.median(stream_routed) / statistics.median(stream_direct)},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("which", choices=["prefix-affinity", "overhead", "all", "stub-backend"])
    parser.add_argument("--port", type=int, default=0, help="stub-backend: the port to serve on")
    parser.add_argument("--model", default=None, help="model directory or .gguf (default: bundled SmolLM2-135M)")
    parser.add_argument("--num-prefixes", type=int, default=8)
    parser.add_argument("--prefix-tokens", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--kv-cache-memory", default="112MiB",
                        help="per replica (the default holds ~4.5 documents of the bundled model)")
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--threads-per-replica", type=int, default=1)
    parser.add_argument("--num-requests", type=int, default=200, help="overhead: non-streaming pairs (model)")
    parser.add_argument("--num-stub-requests", type=int, default=1000,
                        help="overhead: non-streaming pairs (stub backend)")
    parser.add_argument("--num-streams", type=int, default=5, help="overhead: streams each way")
    parser.add_argument("--stream-tokens", type=int, default=256)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.which == "stub-backend":
        import uvicorn

        uvicorn.run(stub_backend_app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)
        return 0
    results = {}
    with tempfile.TemporaryDirectory(prefix="router-bench-") as tmp:
        workdir = Path(tmp)
        if args.which in ("prefix-affinity", "all"):
            results["prefix_affinity"] = bench_prefix_affinity(args, workdir)
        if args.which in ("overhead", "all"):
            results["overhead"] = bench_overhead(args, workdir)
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    if "prefix_affinity" in results:
        r = results["prefix_affinity"]
        print(f"prefix affinity vs round robin ({r['workload']})")
        for key in ("round_robin", "prefix"):
            p = r[key]
            print(f"  {key:<12} hit rate {p['hit_rate']:6.1%}  mean TTFT {1e3 * p['mean_ttft_s']:8.1f} ms  "
                  f"p50 TTFT {1e3 * p['p50_ttft_s']:8.1f} ms  ({p['requests']} requests, {p['elapsed_s']:.1f} s)")
        print(f"  hit rate x{r['hit_rate_ratio']:.2f} (target >= 1.8), TTFT {r['ttft_ratio']:.2f}x lower "
              "(target >= 2)")
    if "overhead" in results:
        o = results["overhead"]
        for key, what in (("non_streaming_stub", "stub backend"), ("non_streaming", "model")):
            n = o[key]
            cpu = (f"; router CPU {n['router_cpu_ms_per_request']:.2f} ms per request"
                   if "router_cpu_ms_per_request" in n else "")
            print(f"router overhead, non-streaming, {what}: p50 direct {n['p50_direct_ms']:.2f} ms, routed "
                  f"{n['p50_routed_ms']:.2f} ms, added {n['p50_added_ms']:.2f} ms (median paired "
                  f"{n['median_paired_added_ms']:.2f} ms; target < 2){cpu}")
        s = o["streaming"]
        print(f"  streaming {s['routed_tokens_per_s']:.1f} vs {s['direct_tokens_per_s']:.1f} tokens/s: "
              f"{s['ratio']:.1%} of direct (target >= 95%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
