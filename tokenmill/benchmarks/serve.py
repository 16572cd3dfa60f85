"""The serving benchmark: streams requests to any OpenAI-compatible server and times each token's arrival.

Requests leave at seeded Poisson (gamma) arrival times, or all at once; an asyncio semaphore caps how many are
in flight. Each response is read as server-sent events ("data: {json}" lines, ending with "data: [DONE]"); the
arrival of each chunk carrying output is one token event. The output token count is the server's usage figure
(stream_options.include_usage) when it sends one, else the number of such chunks.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from dataclasses import dataclass

import httpx
from tqdm.auto import tqdm

from tokenmill.benchmarks.datasets import SampleRequest
from tokenmill.benchmarks.load import arrival_offsets
from tokenmill.benchmarks.metrics import RequestResult

ENDPOINTS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}


@dataclass
class ServeTarget:
    """Where and how to send requests."""

    base_url: str  # e.g. http://127.0.0.1:8000 (a trailing /v1 is accepted)
    model: str | None = None  # None: the first model the server lists at /v1/models
    endpoint: str = "completions"  # "completions" or "chat"
    # Ask the server to generate exactly max_tokens (vLLM's extension; servers that do not know it ignore it).
    ignore_eos: bool = True
    request_timeout_s: float = 600.0

    @property
    def root(self) -> str:
        url = self.base_url.rstrip("/")
        return url[: -len("/v1")] if url.endswith("/v1") else url

    @property
    def url(self) -> str:
        if self.endpoint not in ENDPOINTS:
            raise ValueError(f"endpoint {self.endpoint!r} is not one of {', '.join(ENDPOINTS)}")
        return self.root + ENDPOINTS[self.endpoint]


def _client(limit: int | None, timeout_s: float) -> httpx.AsyncClient:
    # trust_env=False: a proxy set in the environment must not sit between the benchmark and a local server.
    limits = httpx.Limits(max_connections=limit, max_keepalive_connections=limit)
    return httpx.AsyncClient(timeout=httpx.Timeout(timeout_s, connect=30.0), limits=limits, trust_env=False)


async def resolve_model(client: httpx.AsyncClient, target: ServeTarget) -> str:
    if target.model:
        return target.model
    url = target.root + "/v1/models"
    try:
        response = await client.get(url)
        response.raise_for_status()
        models = response.json().get("data") or []
    except (httpx.HTTPError, ValueError) as e:
        raise ValueError(
            f"cannot list the models at {url} ({type(e).__name__}: {e}): check that the server is "
            "running at --base-url, or pass --model"
        ) from e
    if not models:
        raise ValueError(f"{target.root}/v1/models lists no model: pass --model")
    return models[0]["id"]


def request_payload(target: ServeTarget, model: str, request: SampleRequest) -> dict:
    payload = {
        "model": model,
        "max_tokens": request.expected_output_len,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if target.ignore_eos:
        payload["ignore_eos"] = True
    if target.endpoint == "chat":
        payload["messages"] = [{"role": "user", "content": request.prompt}]
    else:
        payload["prompt"] = request.prompt
    return payload


def _chunk_output(chunk: dict) -> str | None:
    """The output text a streamed chunk carries; None for chunks carrying none (usage, role, terminal)."""
    choices = chunk.get("choices") or []
    if not choices:
        return None
    choice = choices[0]
    text = choice.get("text")
    if text is None:
        text = (choice.get("delta") or {}).get("content")
    if text is None or (text == "" and choice.get("finish_reason")):
        return None
    return text


async def send_request(
    client: httpx.AsyncClient, target: ServeTarget, model: str, request: SampleRequest, bench_start: float
) -> RequestResult:
    """One streamed request; never raises for a failed request (success=False with the error instead)."""
    result = RequestResult(prompt_len=request.prompt_len)
    payload = request_payload(target, model, request)
    sent = time.perf_counter()
    result.start_time = sent - bench_start
    last = sent
    num_chunks = 0
    usage_tokens = None
    try:
        async with client.stream("POST", target.url, json=payload) as response:
            if response.status_code != 200:
                body = (await response.aread()).decode(errors="replace")
                result.success = False
                result.error = f"HTTP {response.status_code}: {body[:300]}"
                return result
            async for line in response.aiter_lines():
                line = line.strip()
                if not line.startswith("data:"):
                    continue
                data = line[len("data:") :].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    raise RuntimeError(f"server error in stream: {chunk['error']}")
                usage = chunk.get("usage")
                if usage and usage.get("completion_tokens") is not None:
                    usage_tokens = int(usage["completion_tokens"])
                if _chunk_output(chunk) is None:
                    continue
                now = time.perf_counter()
                if num_chunks == 0:
                    result.ttft = now - sent
                else:
                    result.itl.append(now - last)
                last = now
                num_chunks += 1
        result.latency = time.perf_counter() - sent
        result.output_len = usage_tokens if usage_tokens is not None else num_chunks
        if num_chunks == 0:
            result.ttft = result.latency
    except Exception as e:  # any failure of one request is recorded, the benchmark goes on
        result.success = False
        result.error = f"{type(e).__name__}: {e}"
    return result


@dataclass
class ServeRun:
    results: list[RequestResult]
    duration_s: float
    model: str


async def run_serve(
    target: ServeTarget,
    requests: list[SampleRequest],
    *,
    max_concurrency: int | None = None,
    request_rate: float = math.inf,
    burstiness: float = 1.0,
    seed: int = 0,
    num_warmups: int = 0,
    use_tqdm: bool = True,
) -> ServeRun:
    """Send every request at its arrival time (at most max_concurrency in flight) and collect the results."""
    if max_concurrency is not None and max_concurrency < 1:
        raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
    offsets = arrival_offsets(len(requests), request_rate, burstiness, seed)
    async with _client(max_concurrency, target.request_timeout_s) as client:
        model = await resolve_model(client, target)
        if num_warmups > 0 and requests:
            warmup = SampleRequest(requests[0].prompt, requests[0].prompt_token_ids, 4)
            results = await asyncio.gather(
                *(send_request(client, target, model, warmup, 0.0) for _ in range(num_warmups))
            )
            failed = [r for r in results if not r.success]
            if failed:
                raise ValueError(f"warm-up request to {target.url} failed: {failed[0].error}")
        semaphore = asyncio.Semaphore(max_concurrency) if max_concurrency else None
        bar = tqdm(total=len(requests), desc="Benchmark", unit="req", disable=not use_tqdm)

        async def limited(request: SampleRequest) -> RequestResult:
            if semaphore is None:
                result = await send_request(client, target, model, request, start)
            else:
                async with semaphore:
                    result = await send_request(client, target, model, request, start)
            bar.update(1)
            return result

        start = time.perf_counter()
        tasks = []
        try:
            for offset, request in zip(offsets, requests, strict=True):
                delay = start + offset - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(limited(request)))
            results = await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            bar.close()
        duration = time.perf_counter() - start
    return ServeRun(list(results), duration, model)


def run_serve_sync(target: ServeTarget, requests: list[SampleRequest], **kwargs) -> ServeRun:
    return asyncio.run(run_serve(target, requests, **kwargs))
