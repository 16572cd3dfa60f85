"""The engine core in its own process under `tokenmill serve`: crash isolation and start-up failures."""

from __future__ import annotations

import json
import shutil
import signal
import time

import httpx
import psutil
import pytest

from tests.entrypoints.openai.conftest import ServerProcess, assert_openai_error
from tests.entrypoints.openai.test_lifecycle import LONG, Stream
from tokenmill.worker.executor import worker_process_name

pytestmark = pytest.mark.slow  # starts and kills tokenmill serve processes


def engine_process(server: ServerProcess) -> psutil.Process:
    children = psutil.Process(server.proc.pid).children()
    engines = [c for c in children if "tokenmill.engine.core_proc" in c.cmdline()]
    assert len(engines) == 1, [c.cmdline() for c in children]
    return engines[0]


def test_sigkill_of_the_engine_fails_streams_and_exits(server_model_dir, tmp_path):
    server = ServerProcess([str(server_model_dir), "--dtype", "float32", "--kv-cache-memory", "16MiB",
                            "--max-num-seqs", "8"], tmp_path / "server.log")
    try:
        server.wait_ready()
        engine = engine_process(server)
        tree = psutil.Process(server.proc.pid).children(recursive=True)
        streams = [Stream(server, LONG) for _ in range(8)]
        for stream in streams:
            stream.start()
        for stream in streams:
            assert stream.first_data.wait(60) and stream.status == 200
        health: list[int] = []
        engine.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        # /health turns 503 within a second or two, and stays so until the server exits.
        while time.monotonic() - killed < 5:
            try:
                status = httpx.get(server.url + "/health", timeout=2).status_code
            except httpx.HTTPError:
                break
            health.append(status)
            if status == 503:
                r = httpx.post(server.base_url + "/completions", json={"prompt": "x", "max_tokens": 2})
                assert assert_openai_error(r, 503)["code"] == "engine_failed"
                break
            time.sleep(0.02)
        assert health and health[-1] == 503, health
        assert time.monotonic() - killed < 2.5
        # Every stream ends with an error event, then [DONE], within 5 s of the kill.
        for stream in streams:
            stream.join(max(0.0, killed + 5 - time.monotonic()))
            assert not stream.is_alive(), "a stream hangs after the engine died"
            assert stream.error is None, stream.error
            assert stream.events[-1] == "[DONE]", stream.events[-3:]
            error = json.loads(stream.events[-2])["error"]
            assert error["code"] == "engine_dead" and "died" in error["message"], error
        # The server exits non-zero (a supervisor restarts it) and leaves no process behind.
        assert server.proc.wait(15) == 1
        assert not engine.is_running()
        assert not [p for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        log = server.log()
        assert "The engine died" in log
    finally:
        server.stop()


@pytest.mark.parametrize("problem", ["kv-budget", "broken-weights"])
def test_engine_start_up_failure_gives_the_engine_message(problem, server_model_dir, tmp_path):
    args = ["--dtype", "float32", "--kv-cache-memory", "16MiB"]
    model = server_model_dir
    if problem == "kv-budget":
        args = ["--dtype", "float32", "--kv-cache-memory", "1KiB"]
        expected = "holds no KV block"
    else:
        model = tmp_path / "broken"
        shutil.copytree(server_model_dir, model)
        (model / "model.safetensors").write_bytes(b"not a safetensors file")
        expected = "model.safetensors"
    server = ServerProcess([str(model), *args], tmp_path / "server.log")
    try:
        assert server.proc.wait(120) == 1
    finally:
        server.stop()
    log = server.log()
    assert "start-up failed" in log and expected in log, log[-3000:]
    failure = [line for line in log.splitlines() if "start-up failed" in line]
    assert any(expected in line for line in failure), failure


def test_a_killed_tensor_parallel_worker_fails_streams_and_exits(server_model_dir, tmp_path):
    """`serve -tp 2`: SIGKILL of worker rank 1 mid-generation. The engine core kills the other rank (blocked in
    a collective with the dead one) and fails; every stream ends with an error naming the rank, the server
    exits non-zero and no process of its tree is left."""
    server = ServerProcess([str(server_model_dir), "--dtype", "float32", "--kv-cache-memory", "16MiB",
                            "--max-num-seqs", "4", "--tensor-parallel-size", "2"], tmp_path / "server.log")
    try:
        server.wait_ready()
        engine = engine_process(server)
        workers = [c for c in engine.children() if "spawn_main" in " ".join(c.cmdline())]
        assert len(workers) == 2, [c.cmdline() for c in engine.children()]
        tree = psutil.Process(server.proc.pid).children(recursive=True)
        streams = [Stream(server, LONG) for _ in range(4)]
        for stream in streams:
            stream.start()
        for stream in streams:
            assert stream.first_data.wait(60) and stream.status == 200
        # Each rank names its process (the command lines are the same; start times can share a clock tick).
        assert sorted(w.name() for w in workers) == [worker_process_name(0), worker_process_name(1)]
        rank1 = next(w for w in workers if w.name() == worker_process_name(1))
        rank1.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        for stream in streams:
            stream.join(max(0.0, killed + 10 - time.monotonic()))
            assert not stream.is_alive(), "a stream hangs after a worker died"
            assert stream.error is None, stream.error
            assert stream.events[-1] == "[DONE]", stream.events[-3:]
            error = json.loads(stream.events[-2])["error"]
            assert "rank 1" in error["message"] and "exit code -9" in error["message"], error
        assert server.proc.wait(15) == 1
        assert not [p for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    finally:
        server.stop()
