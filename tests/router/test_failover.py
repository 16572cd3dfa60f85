"""Failover with real processes: a replica SIGKILLed under load, ejected, restarted and re-admitted."""

from __future__ import annotations

import asyncio
import signal
import time

import httpx
import openai
import pytest

from tests.entrypoints.openai.conftest import free_port
from tests.router.conftest import LOCAL_MODEL, FixedPortServer, RouterProcess, serve_args, wait_for

pytestmark = pytest.mark.slow

NUM_WORKERS = 4
MAX_REQUESTS = 80


def _replica_state(router: RouterProcess, url: str) -> dict:
    return next(r for r in router.health()["backends"]["local-small"] if r["url"] == url)


def test_sigkill_one_replica_under_load(server_model_dir, tmp_path):
    ports = [free_port(), free_port()]
    replicas = [FixedPortServer(serve_args(server_model_dir, LOCAL_MODEL), tmp_path / f"r{i}.log", port)
                for i, port in enumerate(ports)]
    router = solo = None
    try:
        for r in replicas:
            r.wait_ready()
        config = {
            "backends": {"local-small": {"urls": [r.base_url for r in replicas], "model": LOCAL_MODEL}},
            "routes": [{"name": "default", "match": {"model": "*"}, "backend": "local-small"}],
            "balancing": "least_outstanding",
            "health": {"interval_s": 0.5, "timeout_s": 1.0},
            "usage_log": str(tmp_path / "usage.jsonl"),
        }
        router = RouterProcess(config, tmp_path, "router").wait_ready()
        victim = replicas[0]
        # A second router whose only replica is the victim: its stream in flight at the kill is cut.
        solo = RouterProcess(dict(config, backends={"local-small": {"urls": [victim.base_url], "model": LOCAL_MODEL}},
                                  usage_log=str(tmp_path / "solo.jsonl")), tmp_path, "solo").wait_ready()
        results: list[tuple[str, bool, bool]] = []  # (kind, ok, had bytes before failing)
        stop = asyncio.Event()

        async def worker(i: int, client: openai.AsyncOpenAI) -> None:
            n = 0
            while not stop.is_set() and len(results) < MAX_REQUESTS:
                n += 1
                prompt = f"worker {i} request {n}: the quick brown fox"
                if n % 2:
                    try:
                        await client.completions.create(model=LOCAL_MODEL, prompt=prompt, max_tokens=24,
                                                        temperature=0.0, extra_body={"ignore_eos": True})
                        results.append(("plain", True, False))
                    except openai.APIError:
                        results.append(("plain", False, False))
                else:
                    received = False
                    try:
                        stream = await client.completions.create(
                            model=LOCAL_MODEL, prompt=prompt, max_tokens=24, temperature=0.0, stream=True,
                            extra_body={"ignore_eos": True})
                        async for _ in stream:
                            received = True
                        results.append(("stream", True, received))
                    except openai.APIError:
                        results.append(("stream", False, received))

        async def run() -> float:
            async with openai.AsyncOpenAI(base_url=router.base_url, api_key="x", max_retries=0,
                                          timeout=60) as client:
                tasks = [asyncio.create_task(worker(i, client)) for i in range(NUM_WORKERS)]
                await asyncio.sleep(2.0)
                async with openai.AsyncOpenAI(base_url=solo.base_url, api_key="x", max_retries=0) as solo_client:
                    long_stream = await solo_client.completions.create(
                        model=LOCAL_MODEL, prompt="a long answer", max_tokens=400, stream=True,
                        extra_body={"ignore_eos": True})
                    await long_stream.__anext__()  # bytes have reached the client
                    victim.proc.send_signal(signal.SIGKILL)
                    killed = time.monotonic()
                    with pytest.raises(openai.APIError) as cut:
                        async for _ in long_stream:
                            pass
                    assert "failed mid-stream" in cut.value.message
                ejected_after = None
                while time.monotonic() - killed < 10:
                    state = await asyncio.to_thread(_replica_state, router, victim.base_url)
                    if not state["healthy"]:
                        ejected_after = time.monotonic() - killed
                        break
                    await asyncio.sleep(0.05)
                await asyncio.sleep(2.0)  # more load on the survivor
                stop.set()
                await asyncio.wait_for(asyncio.gather(*tasks), 120)
                return ejected_after

        ejected_after = asyncio.run(run())
        assert ejected_after is not None and ejected_after < 3.0, ejected_after
        # No request failed unless it had already started streaming.
        failed_unstarted = [r for r in results if not r[1] and not r[2]]
        assert not failed_unstarted, results
        assert sum(1 for r in results if r[1]) >= len(results) - NUM_WORKERS
        victim.proc.wait(10)
        victim._log.close()
        # Restarted at the same address: re-admitted by the probes, and it takes traffic again.
        restarted = FixedPortServer(serve_args(server_model_dir, LOCAL_MODEL), tmp_path / "r0.log", ports[0])
        replicas[0] = restarted
        restarted.wait_ready()
        ready = time.monotonic()
        wait_for(lambda: _replica_state(router, restarted.base_url)["healthy"], 5.0, what="re-admission")
        assert time.monotonic() - ready < 5.0
        before = _replica_state(router, restarted.base_url)["requests"]
        client = openai.OpenAI(base_url=router.base_url, api_key="x", max_retries=0)
        for i in range(4):
            client.completions.create(model=LOCAL_MODEL, prompt=f"after restart {i}", max_tokens=2)
        assert _replica_state(router, restarted.base_url)["requests"] >= before + 1
        served = httpx.get(restarted.url + "/metrics").text
        assert 'vllm:request_success_total{finished_reason="length"' in served
        metrics = router.metrics()
        assert sum(v for k, v in metrics.items() if k.startswith("tokenmill_router:ejections_total{")) >= 1
        assert metrics[f"tokenmill_router:backend_healthy{{backend=local-small,replica={restarted.base_url}}}"] == 1
        assert solo.metrics()["tokenmill_router:stream_errors_total{backend=local-small}"] == 1
    finally:
        for r in (router, solo):
            if r is not None:
                r.stop()
        for r in replicas:
            r.stop()
