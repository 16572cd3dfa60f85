"""What the HTTP server costs: output-token throughput of N concurrent streaming clients vs the offline API.

Both runs use the same model, engine flags and workload (greedy, ignore_eos, fixed max_tokens, so both generate
exactly the same number of tokens). The offline run is LLM.generate() on all prompts at once (called from a
worker thread, as the server's engine loop runs: see --offline-main-thread); the server run
starts `tokenmill serve` as a subprocess and has --num-clients concurrent clients stream /v1/completions,
each taking prompts from a shared list until none are left. The clients run in this process on the same CPUs as
the server: by default a lean asyncio reader (_LeanConnection), so the load generator's own CPU use stays small
(it is printed); --client httpx drives the server with httpx instead.

    python benchmarks/serving_overhead.py                     # bundled SmolLM2-135M, 64 clients
    python benchmarks/serving_overhead.py MODEL_DIR --num-clients 64 --max-tokens 128 --json

The server runs its engine core in a child process (`serve`'s default); --no-engine-process runs it in a thread
of the server's process instead, for comparison. The target is server throughput >= 98% of offline (--min-ratio,
checked with --check).
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import httpx

WORDS = ("engine", "batch", "token", "cache", "block", "prefix", "stream", "server", "model", "request", "queue",
         "latency", "throughput", "kernel", "memory", "scheduler")


def make_prompts(num_prompts: int, prompt_words: int) -> list[str]:
    """Distinct prompts (no shared prefix, so prefix caching does not favour either run)."""
    prompts = []
    for i in range(num_prompts):
        words = [WORDS[(i * 7 + j * (i % 5 + 1)) % len(WORDS)] for j in range(prompt_words)]
        prompts.append(f"Request {i}: " + " ".join(words))
    return prompts


def engine_flags(args: argparse.Namespace) -> list[str]:
    flags = ["--dtype", args.dtype, "--max-num-seqs", str(args.max_num_seqs)]
    if args.kv_cache_memory:
        flags += ["--kv-cache-memory", args.kv_cache_memory]
    if args.max_model_len:
        flags += ["--max-model-len", str(args.max_model_len)]
    return flags


class OfflineRunner:
    """LLM.generate() on the whole workload; the model is loaded once for all repeats."""

    def __init__(self, args: argparse.Namespace) -> None:
        from tokenmill import LLM

        self.args = args
        self.llm = LLM(args.model, dtype=args.dtype, max_num_seqs=args.max_num_seqs,
                       kv_cache_memory=args.kv_cache_memory, max_model_len=args.max_model_len, show_progress=False)

    def run(self, prompts: list[str]) -> dict:
        from tokenmill import SamplingParams

        llm, args = self.llm, self.args
        params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)

        def generate():
            llm.generate(prompts[:2], SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)  # warm-up
            busy_before = llm.llm_engine.scheduler_stats.busy_seconds
            start = time.perf_counter()
            outputs = llm.generate(prompts, params, use_tqdm=False)
            return outputs, time.perf_counter() - start, llm.llm_engine.scheduler_stats.busy_seconds - busy_before

        cpu_before = time.process_time()
        if args.offline_main_thread:
            outputs, seconds, busy = generate()
        else:
            # As the server steps its engine: in a thread other than the main one.
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                outputs, seconds, busy = pool.submit(generate).result()
        num_tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
        # CPU time of the whole process (all torch threads), warm-up included.
        return {"seconds": seconds, "output_tokens": num_tokens, "tokens_per_s": num_tokens / seconds,
                "engine_busy_s": busy, "cpu_s": time.process_time() - cpu_before}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _client(events, queue: asyncio.Queue, max_tokens: int, results: list) -> None:
    """Streams prompts from the shared queue one after another; events(body) yields the response's lines."""
    while True:
        try:
            prompt = queue.get_nowait()
        except asyncio.QueueEmpty:
            return
        body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}
        sent = time.perf_counter()
        first = last_data = None
        async for line in events(body):
            if not line.startswith("data: "):
                continue
            if first is None:
                first = time.perf_counter()
            if line != "data: [DONE]":
                last_data = line
        usage = json.loads(last_data[6:])["usage"]
        results.append({"output_tokens": usage["completion_tokens"], "ttft_s": first - sent,
                        "e2e_s": time.perf_counter() - sent})


def _httpx_events(http: httpx.AsyncClient, url: str):
    async def events(body: dict):
        async with http.stream("POST", url, json=body) as response:
            response.raise_for_status()
            async for line in response.aiter_lines():
                yield line
    return events


class _LeanConnection:
    """A keep-alive HTTP/1.1 connection that POSTs JSON and reads the server-sent events of the response.

    The load generator shares the machine's CPUs with the server it measures: httpx spends about 250 us of CPU
    per streamed event here (2.1 CPU-s of a 17 s run on 2 cores), this reader about a tenth of that, so the
    figure measures the server rather than its client. --client httpx uses httpx instead.
    """

    def __init__(self, host: str, port: int, headers: dict[str, str] | None = None) -> None:
        self.host, self.port = host, port
        self.extra_headers = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post_events(self, path: str, payload: dict):
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        body = json.dumps(payload).encode()
        self.writer.write(f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Type: application/json"
                          f"\r\nContent-Length: {len(body)}\r\n{self.extra_headers}\r\n".encode() + body)
        reader = self.reader
        status = await reader.readline()
        headers = {}
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            headers[name.strip().lower()] = value.strip()
        if b" 200 " not in status or headers.get("transfer-encoding") != "chunked":
            raise RuntimeError(f"unexpected response {status!r} {headers}")
        pending = b""
        while True:
            size = int((await reader.readline()).split(b";")[0], 16)
            if size == 0:
                await reader.readline()
                return
            pending += await reader.readexactly(size)
            await reader.readexactly(2)
            *events, pending = pending.split(b"\n\n")
            for event in events:
                yield event.decode()

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


async def _lean_client(base_url: str, queue: asyncio.Queue, max_tokens: int, results: list) -> None:
    host, port = base_url.removeprefix("http://").split(":")
    connection = _LeanConnection(host, int(port))
    try:
        await _client(lambda body: connection.post_events("/v1/completions", body), queue, max_tokens, results)
    finally:
        await connection.close()


async def _drive(base_url: str, prompts: list[str], num_clients: int, max_tokens: int,
                 client: str = "lean") -> tuple[float, list]:
    queue: asyncio.Queue = asyncio.Queue()
    for prompt in prompts:
        queue.put_nowait(prompt)
    results: list = []
    limits = httpx.Limits(max_connections=num_clients, max_keepalive_connections=num_clients)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        url = base_url + "/v1/completions"
        # Warm-up: one short request (first-request costs are not serving overhead).
        await http.post(url, json={"prompt": "warm up", "max_tokens": 4})
        start = time.perf_counter()
        if client == "httpx":
            events = _httpx_events(http, url)
            await asyncio.gather(*(_client(events, queue, max_tokens, results) for _ in range(num_clients)))
        else:
            await asyncio.gather(*(_lean_client(base_url, queue, max_tokens, results) for _ in range(num_clients)))
        seconds = time.perf_counter() - start
    return seconds, results


class ServerRunner:
    """`tokenmill serve` as a subprocess (started once), driven by concurrent streaming clients."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        port = _free_port()
        cmd = [sys.executable, "-m", "tokenmill.entrypoints.cli", "serve"] + ([args.model] if args.model else [])
        cmd += engine_flags(args) + ["--host", "127.0.0.1", "--port", str(port), "--disable-uvicorn-access-log",
                                     "--log-stats-interval", "0"]
        cmd += ["--engine-process" if args.engine_process else "--no-engine-process"]
        self.base_url = f"http://127.0.0.1:{port}"
        env = None
        if args.server_torch_threads:
            # torch sizes its intra-op thread team from OMP_NUM_THREADS at import; the server's engine process
            # inherits it. The offline run keeps torch's default, so this measures the cap, not a fair baseline.
            env = {**os.environ, "OMP_NUM_THREADS": str(args.server_torch_threads)}
        self.log = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        try:
            self._wait_ready()
        except BaseException:
            self.close()
            raise

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.args.startup_timeout
        while True:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{self.log.read()}")
            try:
                if httpx.get(self.base_url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server was not ready after {self.args.startup_timeout} s")
            time.sleep(0.2)

    def run(self, prompts: list[str]) -> dict:
        args = self.args
        busy_before = _busy_seconds(self.base_url)
        cpu_before = self._cpu_seconds()
        client_cpu = time.process_time()
        seconds, results = asyncio.run(_drive(self.base_url, prompts, args.num_clients, args.max_tokens, args.client))
        client_cpu = time.process_time() - client_cpu
        server_cpu, engine_cpu = (after - before for after, before in zip(self._cpu_seconds(), cpu_before))
        busy = _busy_seconds(self.base_url) - busy_before
        num_tokens = sum(r["output_tokens"] for r in results)
        ttfts = sorted(r["ttft_s"] for r in results)
        return {"seconds": seconds, "output_tokens": num_tokens, "tokens_per_s": num_tokens / seconds,
                "engine_busy_s": busy, "ttft_p50_s": ttfts[len(ttfts) // 2], "ttft_max_s": ttfts[-1],
                "client_cpu_s": client_cpu, "server_cpu_s": server_cpu, "engine_process_cpu_s": engine_cpu}

    def _cpu_seconds(self) -> tuple[float, float]:
        """CPU seconds (user + system, all threads) of the server's process and of its children (the engine
        process), so that a run shows where the two cores went."""
        import psutil

        server = psutil.Process(self.proc.pid)
        times = server.cpu_times()
        children = 0.0
        for child in server.children(recursive=True):
            try:
                child_times = child.cpu_times()
            except psutil.NoSuchProcess:
                continue
            children += child_times.user + child_times.system
        return times.user + times.system, children

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


def _busy_seconds(base_url: str) -> float | None:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(base_url + "/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "tokenmill:engine_busy_seconds_total":
                return sample.value
    return 0.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("model", nargs="?", default=None, help="model directory or .gguf (default: bundled SmolLM2)")
    parser.add_argument("--num-clients", type=int, default=64, help="concurrent streaming clients")
    parser.add_argument("--num-prompts", type=int, default=None, help="requests in all (default: num-clients)")
    parser.add_argument("--prompt-words", type=int, default=24, help="words per prompt")
    parser.add_argument("--max-tokens", type=int, default=128, help="tokens generated per request")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--kv-cache-memory", default="1GiB", help="per engine (offline and server)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="alternate offline and server runs this many times; the best of each is compared")
    parser.add_argument("--client", choices=["lean", "httpx"], default="lean",
                        help="the streaming clients: a minimal asyncio HTTP/1.1 event reader, or httpx (whose own CPU "
                             "use on the server's machine is about ten times larger)")
    parser.add_argument("--startup-timeout", type=float, default=300.0)
    parser.add_argument("--min-ratio", type=float, default=0.98, help="target server/offline throughput")
    parser.add_argument("--engine-process", action=argparse.BooleanOptionalAction, default=True,
                        help="the server's engine core in a child process (serve's default), or in a thread")
    parser.add_argument("--server-torch-threads", type=int, default=None,
                        help="torch threads of the server's engine (OMP_NUM_THREADS in the server's environment), to "
                             "measure a cap when clients and server share the cores; default: torch's default, as "
                             "offline")
    parser.add_argument("--check", action="store_true", help="exit 1 when the ratio is below --min-ratio")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--offline-main-thread", action="store_true",
                        help="call the offline generate() from the main thread; by default it runs in a worker "
                             "thread, as the server steps its engine (on a CPU shared with other processes, torch's "
                             "thread team in the main thread can be several times slower, which flatters the server)")
    args = parser.parse_args(argv)
    prompts = make_prompts(args.num_prompts or args.num_clients, args.prompt_words)

    # Both stay loaded; the runs alternate so that a busy spell of the machine hits both alike.
    offline_runner = OfflineRunner(args)
    server_runner = ServerRunner(args)
    offline_runs, server_runs = [], []
    try:
        for _ in range(args.repeat):
            offline_runs.append(offline_runner.run(prompts))
            server_runs.append(server_runner.run(prompts))
    finally:
        server_runner.close()
    offline = max(offline_runs, key=lambda r: r["tokens_per_s"])
    server = max(server_runs, key=lambda r: r["tokens_per_s"])
    ratio = server["tokens_per_s"] / offline["tokens_per_s"]
    result = {
        "benchmark": "serving_overhead",
        "model": args.model or "HuggingFaceTB/SmolLM2-135M-Instruct",
        "num_clients": args.num_clients, "num_requests": len(prompts), "max_tokens": args.max_tokens,
        "cpu_count": os.cpu_count(), "client": args.client, "engine_process": args.engine_process,
        "offline_main_thread": args.offline_main_thread, "repeat": args.repeat,
        "server_torch_threads": args.server_torch_threads,
        "offline": offline, "server": server, "ratio": ratio, "min_ratio": args.min_ratio,
        "passed": ratio >= args.min_ratio, "offline_runs": offline_runs, "server_runs": server_runs,
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"workload: {len(prompts)} requests x {args.max_tokens} tokens, {args.num_clients} concurrent "
              f"streaming clients, model {result['model']}")
        print(f"best of {args.repeat} run(s) each; server engine "
              f"{'in a child process' if args.engine_process else 'in a thread of the server'}")
        print(f"offline: {offline['output_tokens']} tokens in {offline['seconds']:.2f} s = "
              f"{offline['tokens_per_s']:.1f} output tok/s (engine busy {offline['engine_busy_s']:.2f} s)")
        print(f"server:  {server['output_tokens']} tokens in {server['seconds']:.2f} s = "
              f"{server['tokens_per_s']:.1f} output tok/s (engine busy {server['engine_busy_s']:.2f} s, "
              f"TTFT p50 {server['ttft_p50_s']:.3f} s; {args.client} clients used {server['client_cpu_s']:.2f} CPU-s)")
        print(f"CPU-s: offline process {offline['cpu_s']:.2f}; server process {server['server_cpu_s']:.2f}, "
              f"engine process {server['engine_process_cpu_s']:.2f}, clients {server['client_cpu_s']:.2f}")
        print(f"ratio server/offline: {ratio:.3f} (target >= {args.min_ratio}); HTTP time outside engine steps: "
              f"{server['seconds'] - server['engine_busy_s']:.2f} s of {server['seconds']:.2f} s")
    return 1 if args.check and not result["passed"] else 0


if __name__ == "__main__":
    sys.exit(main())
