"""`tokenmill route` benchmarks: prefix affinity vs round robin, and the router's own overhead.

prefix-affinity: 2 `tokenmill serve` replicas behind the router; a prefix-repetition workload (chat requests whose
system message is one of --num-prefixes documents of --prefix-tokens tokens, each asked --rounds different
questions, in a shuffled order, --concurrency at a time) is run once with `balancing: round_robin` and once with
`balancing: prefix`, each time with fresh documents. Reported per policy: the backends' prefix-cache hit rate
(vllm:prefix_cache_hits / vllm:prefix_cache_queries, summed over both replicas) and the mean TTFT seen by the
client through the router. Each replica's KV cache is sized by --kv-cache-memory: by default it holds about
4.5 of the 8 documents, as in a deployment whose documents fill more than one replica's cache.

overhead: one replica; the same requests sent alternately straight to it and through the router.
Non-streaming: the p50 latency the router adds (max_tokens 1). Streaming: output tokens per second of long
streams (ignore_eos) through the router as a share of direct.

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


def start_replica(args: argparse.Namespace, workdir: Path, name: str) -> tuple[Proc, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "tokenmill.entrypoints.cli", "serve", *([args.model] if args.model else []),
           "--host", "127.0.0.1", "--port", str(port), "--kv-cache-memory", args.kv_cache_memory,
           "--max-model-len", str(args.max_model_len), "--log-stats-interval", "0", "--disable-uvicorn-access-log",
           "--served-model-name", "bench-model"]
    proc = Proc(cmd, workdir / f"{name}.log", env={"OMP_NUM_THREADS": str(args.threads_per_replica)})
    return proc, f"http://127.0.0.1:{port}"


def start_router(urls: list[str], policy: str, workdir: Path, name: str) -> tuple[Proc, str]:
    port = free_port()
    config = {"backends": {"pool": {"urls": [u + "/v1" for u in urls], "model": "bench-model"}},
              "routes": [{"name": "all", "match": {"model": "*"}, "backend": "pool"}],
              "balancing": {"policy": policy}, "health": {"interval_s": 5.0}}
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


def bench_overhead(args: argparse.Namespace, workdir: Path) -> dict:
    proc, url = start_replica(args, workdir, "overhead-replica")
    router = None
    try:
        proc.wait_ready(url)
        router, router_url = start_router([url], "prefix", workdir, "router-overhead")
        client = httpx.Client(timeout=600)
        body = {"model": "bench-model", "prompt": "The router adds", "max_tokens": 1, "temperature": 0.0}
        for target in (url, router_url):  # warm up connections and the engine
            for _ in range(5):
                client.post(target + "/v1/completions", json=body).raise_for_status()
        direct, routed, paired = [], [], []
        cpu_before = process_cpu_seconds(router.proc.pid)
        for _ in range(args.num_requests):
            times = {}
            for target in (url, router_url):
                start = time.perf_counter()
                client.post(target + "/v1/completions", json=body).raise_for_status()
                times[target] = time.perf_counter() - start
            direct.append(times[url])
            routed.append(times[router_url])
            paired.append(times[router_url] - times[url])
        router_cpu = process_cpu_seconds(router.proc.pid) - cpu_before

        async def streams(target: str) -> tuple[float, int]:
            async with httpx.AsyncClient() as aclient:
                start = time.perf_counter()
                _, num_chunks = await stream_ttft(aclient, target, {
                    "model": "bench-model", "prompt": "Streaming through the router", "max_tokens": args.stream_tokens,
                    "temperature": 0.0, "stream": True, "ignore_eos": True})
                return time.perf_counter() - start, num_chunks

        stream_direct, stream_routed = [], []
        for _ in range(args.num_streams):
            for target, out in ((url, stream_direct), (router_url, stream_routed)):
                seconds, num_chunks = asyncio.run(streams(target))
                out.append(num_chunks / seconds)
    finally:
        if router is not None:
            router.stop()
        proc.stop()
    p50_direct, p50_routed = statistics.median(direct), statistics.median(routed)
    return {
        "non_streaming": {"requests": args.num_requests, "p50_direct_ms": 1e3 * p50_direct,
                          "p50_routed_ms": 1e3 * p50_routed, "p50_added_ms": 1e3 * (p50_routed - p50_direct),
                          "median_paired_added_ms": 1e3 * statistics.median(paired),
                          "router_cpu_ms_per_request": 1e3 * router_cpu / args.num_requests},
        "streaming": {"streams": args.num_streams, "max_tokens": args.stream_tokens,
                      "direct_tokens_per_s": statistics.median(stream_direct),
                      "routed_tokens_per_s": statistics.median(stream_routed),
                      "ratio": statistics.median(stream_routed) / statistics.median(stream_direct)},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("which", choices=["prefix-affinity", "overhead", "all"])
    parser.add_argument("--model", default=None, help="model directory or .gguf (default: bundled SmolLM2-135M)")
    parser.add_argument("--num-prefixes", type=int, default=8)
    parser.add_argument("--prefix-tokens", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--kv-cache-memory", default="112MiB",
                        help="per replica (the default holds ~4.5 documents of the bundled model)")
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--threads-per-replica", type=int, default=1)
    parser.add_argument("--num-requests", type=int, default=200, help="overhead: non-streaming pairs")
    parser.add_argument("--num-streams", type=int, default=5, help="overhead: streams each way")
    parser.add_argument("--stream-tokens", type=int, default=256)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
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
        n, s = o["non_streaming"], o["streaming"]
        print(f"router overhead: non-streaming p50 direct {n['p50_direct_ms']:.2f} ms, routed "
              f"{n['p50_routed_ms']:.2f} ms, added {n['p50_added_ms']:.2f} ms (median paired "
              f"{n['median_paired_added_ms']:.2f} ms; target < 2); router CPU "
              f"{n['router_cpu_ms_per_request']:.2f} ms per request")
        print(f"  streaming {s['routed_tokens_per_s']:.1f} vs {s['direct_tokens_per_s']:.1f} tokens/s: "
              f"{s['ratio']:.1%} of direct (target >= 95%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
