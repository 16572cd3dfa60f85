"""The Ray executor (distributed_executor_backend="ray") against a real Ray cluster: a head node started by the
test on 127.0.0.1 (`ray start --head --block` in its own session, stopped after, even on failure), joined by the
engine through RAY_ADDRESS. Tensor parallelism over Ray actors gives TP=1's tokens; a killed actor takes the
engine down with an error and leaves no actor behind; a cluster without room for the workers is refused fast."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import torch

from tokenmill.config import EngineConfig
from tokenmill.engine.engine_core import EngineCore
from tokenmill.model.loader import read_hf_config
from tokenmill.request import Request
from tokenmill.sampling_params import SamplingParams
from tokenmill.worker.executor import WorkerProcessError
from tokenmill.worker.ray_executor import (
    PER_WORKER_CPUS_ENV,
    PLACEMENT_TIMEOUT_ENV,
    RankPlacement,
    check_cluster_fits,
    default_cpus_per_worker,
    place_ranks,
)

CLUSTER_CPUS = 4


# ---- without a cluster --------------------------------------------------------------------------------------
def test_ray_is_a_backend_choice():
    from tokenmill.engine.arg_utils import EngineArgs

    config = EngineArgs.from_kwargs("m", tensor_parallel_size=2, distributed_executor_backend="ray") \
        .create_engine_config()
    assert config.distributed_executor_backend == "ray"
    with pytest.raises(ValueError, match="'uni', 'mp' or 'ray'"):
        EngineConfig.from_kwargs("m", distributed_executor_backend="dask").validate()


def test_missing_ray_names_the_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    config = EngineConfig.from_kwargs(str(tmp_path), device="cpu", distributed_executor_backend="ray")
    with pytest.raises(ImportError, match=r"pip install ray \(or pip install 'tokenmill\[ray\]'\)"):
        EngineCore(config, tmp_path, show_progress=False)


@pytest.mark.parametrize("name, value", [(PER_WORKER_CPUS_ENV, "0"), (PER_WORKER_CPUS_ENV, "two"),
                                         (PLACEMENT_TIMEOUT_ENV, "-1")])
def test_bad_environment_is_refused_before_connecting(monkeypatch, tmp_path, name, value):
    monkeypatch.setenv(name, value)
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")  # never reached: the value is checked first
    config = EngineConfig.from_kwargs(str(tmp_path), device="cpu", distributed_executor_backend="ray")
    with pytest.raises(ValueError, match=f"{name}={value!r} must be a positive"):
        EngineCore(config, tmp_path, show_progress=False)


def test_unreachable_ray_address_is_refused_at_once(monkeypatch, tmp_path):
    import ray

    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{_free_port()}")  # nothing listens there
    config = EngineConfig.from_kwargs(str(tmp_path), device="cpu", distributed_executor_backend="ray")
    start = time.monotonic()
    with pytest.raises(ConnectionError, match=r"cannot connect to the Ray cluster at RAY_ADDRESS='127\.0\.0\.1:\d+' "
                                              r"\(.*refused.*\): start it"):
        EngineCore(config, tmp_path, show_progress=False)
    assert time.monotonic() - start < 5
    assert not ray.is_initialized()


def test_default_cpus_per_worker_places_every_rank():
    assert default_cpus_per_worker([4.0], 2) == 2
    assert default_cpus_per_worker([4.0], 3) == 1
    assert default_cpus_per_worker([2.0, 2.0, 2.0], 2) == 2  # not 3: no node holds 3
    assert default_cpus_per_worker([8.0, 2.0], 2) == 4
    assert default_cpus_per_worker([1.0], 4) == 1  # does not fit; the placement check says so
    check_cluster_fits({"a": {"CPU": 2.0}, "b": {"CPU": 2.0}}, {"CPU": 2.0}, 2, "tp=2")
    with pytest.raises(ValueError, match=r"cannot hold 2 workers \(tp=2\) of \{CPU: 3\} each: its 1 node\(s\) "
                                         r"have room for 1 \(a: CPU 4\)"):
        check_cluster_fits({"a": {"CPU": 4.0}}, {"CPU": 3.0}, 2, "tp=2")
    with pytest.raises(ValueError, match=r"room for 0 \(a: GPU 0\)"):
        check_cluster_fits({"a": {"CPU": 4.0}}, {"GPU": 1.0}, 1, "tp=1")


def test_ranks_follow_nodes_and_local_ranks_their_gpus():
    """Bundles placed on nodes a, b, a, b: a's actors get ranks 0-1 and b's 2-3 (tensor-parallel pairs share a
    node); each sees its node's GPUs and takes its own GPU's index there as local rank."""
    def at(node: str, gpu: str | None) -> dict:
        return {"node_id": node, "gpu_ids": [gpu] if gpu else []}

    infos = [at("a", "3"), at("b", "0"), at("a", "1"), at("b", "1")]
    assert place_ranks(infos) == [
        RankPlacement(0, 1, {"CUDA_VISIBLE_DEVICES": "1,3"}), RankPlacement(2, 0, {"CUDA_VISIBLE_DEVICES": "1,3"}),
        RankPlacement(1, 0, {"CUDA_VISIBLE_DEVICES": "0,1"}), RankPlacement(3, 1, {"CUDA_VISIBLE_DEVICES": "0,1"}),
    ]
    cpu = place_ranks([at("b", None), at("a", None), at("b", None)])
    assert [(p.actor_index, p.local_rank, p.env) for p in cpu] == [(0, 0, {}), (2, 1, {}), (1, 0, {})]


# ---- a local cluster ----------------------------------------------------------------------------------------
def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _session_processes(sid: int) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter():
        try:
            if os.getsid(process.pid) == sid:
                found.append(process)
        except (ProcessLookupError, PermissionError, psutil.Error):
            pass
    return found


@pytest.fixture(scope="module")
def ray_cluster():
    """RAY_ADDRESS of a one-node Ray cluster with CLUSTER_CPUS CPUs. Stopped by ending its `ray start --block`
    process and then anything left in its session (not `ray stop`, which would stop every Ray on the machine)."""
    import ray

    # Short: Ray's unix socket paths live under it and must stay under 108 bytes.
    temp_dir = tempfile.mkdtemp(prefix="tmray", dir="/tmp")
    port = _free_port()
    log_path = Path(temp_dir) / "ray_start.log"
    log = open(log_path, "w")  # noqa: SIM115 - closed below
    # A loopback cluster without token authentication, whether or not ~/.ray/auth_token exists (Ray turns it on
    # for a new cluster when that file does); this process and the engine's join it the same way.
    os.environ["RAY_AUTH_MODE"] = "disabled"
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys; from ray.scripts.scripts import main; sys.exit(main())", "start", "--head", "--block", "--node-ip-address",
         "127.0.0.1", "--port", str(port), "--num-cpus", str(CLUSTER_CPUS), "--include-dashboard=false",
         "--disable-usage-stats", "--object-store-memory", str(80 * 2**20), "--temp-dir", temp_dir],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    saved = {name: os.environ.get(name) for name in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    try:
        deadline = time.monotonic() + 90
        while "Ray runtime started" not in log_path.read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ray start failed:\n{log_path.read_text(errors='replace')}")
            time.sleep(0.2)
        os.environ["RAY_ADDRESS"] = f"127.0.0.1:{port}"
        yield os.environ["RAY_ADDRESS"]
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        if ray.is_initialized():
            ray.shutdown()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        for process in _session_processes(proc.pid):
            try:
                process.kill()
            except psutil.Error:
                pass
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture
def ray_client(ray_cluster):
    """This process connected to the cluster (the executor then uses the connection and leaves it open)."""
    import ray

    if not ray.is_initialized():
        ray.init(address=ray_cluster, logging_level="WARNING", log_to_driver=False)
    return ray


def _wait_gone(pids: list[int], timeout: float = 15.0) -> list[int]:
    """The pids still running (zombies count as gone) after waiting up to timeout seconds."""
    deadline = time.monotonic() + timeout
    while True:
        alive = []
        for pid in pids:
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    alive.append(pid)
            except psutil.NoSuchProcess:
                pass
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.1)


def _prompts(vocab_size: int, lengths=(5, 40, 17, 9)) -> list[list[int]]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(3, vocab_size, (n,), generator=g).tolist() for n in lengths]


def _one_process_reference(model_dir: str) -> tuple[dict, SamplingParams, list[list[int]], list[list[int]]]:
    """The engine arguments, sampling params and prompts the Ray tests use, and one process's greedy tokens."""
    from tokenmill import LLM

    kwargs = dict(dtype="float32", device="cpu", max_num_batched_tokens=16, max_model_len=128,
                  show_progress=False)
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    prompts = _prompts(read_hf_config(model_dir)["vocab_size"])
    reference = LLM(model_dir, **kwargs)
    expected = [list(o.outputs[0].token_ids) for o in reference.generate(prompts, params, use_tqdm=False)]
    reference.llm_engine.shutdown()
    return kwargs, params, prompts, expected


@pytest.mark.slow
def test_ray_tp2_gives_tp1_tokens(ray_cluster, tiny_models):
    """TP=2 in two Ray actors (the engine connects through RAY_ADDRESS), async-scheduled, gives TP=1's greedy
    tokens, with chunked prefill; each actor's torch threads are its bundle's CPUs; shutdown leaves no actor
    process and disconnects from the cluster, which runs on."""
    import ray

    from tokenmill import LLM

    if ray.is_initialized():  # another test's connection: the engine is to make its own
        ray.shutdown()
    model_dir = str(tiny_models["llama"])
    kwargs, params, prompts, expected = _one_process_reference(model_dir)

    llm = LLM(model_dir, tensor_parallel_size=2, distributed_executor_backend="ray", async_scheduling=True,
              **kwargs)
    try:
        info = llm.llm_engine.engine_info()
        assert info["distributed_executor_backend"] == "ray"
        ranks = info["ranks"]
        assert [r["rank"] for r in ranks] == [0, 1]
        # The default bundle: the cluster's CPUs shared by the two ranks, and as many torch threads.
        assert [r["num_cpu_threads"] for r in ranks] == [CLUSTER_CPUS // 2] * 2
        pids = [r["pid"] for r in ranks]
        assert len(set(pids)) == 2 and os.getpid() not in pids
        outputs = llm.generate(prompts, params, use_tqdm=False)
        assert [list(o.outputs[0].token_ids) for o in outputs] == expected
    finally:
        llm.llm_engine.shutdown()
    assert _wait_gone(pids) == []
    assert not ray.is_initialized()  # the engine connected, so it disconnected; the cluster runs on
    assert ray.init(address=ray_cluster, logging_level="WARNING", log_to_driver=False) is not None
    ray.shutdown()


@pytest.mark.slow
def test_ray_pipeline_stages_give_one_stage_tokens(ray_cluster, tiny_models):
    """PP=2 in two Ray actors (one stage each, async-scheduled, chunked prefill) gives one process's greedy
    tokens: the pipeline's activations and sampled ids travel between actors as between worker processes."""
    import ray

    from tokenmill import LLM

    if ray.is_initialized():
        ray.shutdown()
    model_dir = str(tiny_models["qwen2"])
    kwargs, params, prompts, expected = _one_process_reference(model_dir)

    llm = LLM(model_dir, pipeline_parallel_size=2, distributed_executor_backend="ray", async_scheduling=True,
              **kwargs)
    try:
        ranks = llm.llm_engine.engine_info()["ranks"]
        assert [(r["rank"], r["pp_rank"]) for r in ranks] == [(0, 0), (1, 1)]
        outputs = llm.generate(prompts, params, use_tqdm=False)
        assert [list(o.outputs[0].token_ids) for o in outputs] == expected
    finally:
        llm.llm_engine.shutdown()
    assert _wait_gone([r["pid"] for r in ranks]) == []


def _ray_core(model_dir: Path, **kwargs) -> EngineCore:
    config = EngineConfig.from_kwargs(
        str(model_dir), dtype="float32", device="cpu", max_num_batched_tokens=16, max_model_len=128,
        distributed_executor_backend="ray", **kwargs,
    )
    return EngineCore(config, model_dir, show_progress=False)


@pytest.mark.slow
def test_killed_actor_fails_the_engine_and_leaves_no_actor(ray_client, tiny_models, monkeypatch):
    """A rank's process killed between steps of an async-scheduled run (its peer then waits for it in an
    all-reduce): the next step raises WorkerProcessError naming the rank, at once; every actor is killed and the
    placement group removed; later steps raise the same error; shutdown is clean."""
    ray = ray_client
    monkeypatch.setenv(PER_WORKER_CPUS_ENV, "1")
    core = _ray_core(tiny_models["llama"], tensor_parallel_size=2, async_scheduling=True)
    try:
        executor = core.executor
        ranks = core.engine_info()["ranks"]
        assert [r["num_cpu_threads"] for r in ranks] == [1, 1]
        pids = [r["pid"] for r in ranks]
        actor_ids = [r["actor_id"] for r in ranks]
        placement_group = executor.placement_group
        for i, prompt in enumerate(_prompts(core.spec.vocab_size)):
            core.add_request(Request(f"r{i}", prompt, SamplingParams(temperature=0, max_tokens=50,
                                                                     ignore_eos=True), frozenset({0})))
        for _ in range(3):
            core.step()
        os.kill(pids[1], signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(WorkerProcessError, match=rf"worker process died \(rank 1, pid {pids[1]}"):
            for _ in range(100):
                core.step()
        assert time.monotonic() - start < 30  # not the collectives' timeout (300 s)
        assert _wait_gone(pids) == []
        assert ray.util.placement_group_table(placement_group)["state"] == "REMOVED"
        # Ray's own record: none of the workers' actors is alive (the GCS actor table, read without a dashboard).
        from ray._private import state

        deadline = time.monotonic() + 15
        while {state.actors(a)["State"] for a in actor_ids} != {"DEAD"} and time.monotonic() < deadline:
            time.sleep(0.1)
        assert {state.actors(a)["State"] for a in actor_ids} == {"DEAD"}
        with pytest.raises(WorkerProcessError, match="rank 1"):
            core.step()
    finally:
        core.shutdown()
    assert ray.is_initialized()  # the test's own connection is left alone


@pytest.mark.slow
def test_cluster_without_room_is_refused_fast(ray_client, tiny_models, monkeypatch):
    """Bundles no node can hold (3 CPUs x 2 on 4 CPUs; a GPU on a CPU-only cluster) are refused at once; bundles
    that would fit but whose CPUs another placement group holds are refused after the placement timeout. Neither
    leaves a placement group behind."""
    ray = ray_client
    model_dir = tiny_models["llama"]
    before = set(ray.util.placement_group_table())
    start = time.monotonic()
    monkeypatch.setenv(PER_WORKER_CPUS_ENV, "3")
    with pytest.raises(ValueError, match=r"cannot hold 2 workers \(tensor_parallel_size=2 x pipeline_parallel_size"
                                         r"=1\) of \{CPU: 3\} each: its 1 node\(s\) have room for 1 .*CPU 4.*"
                                         r"lower TOKENMILL_RAY_PER_WORKER_CPUS"):
        _ray_core(model_dir, tensor_parallel_size=2)
    monkeypatch.delenv(PER_WORKER_CPUS_ENV)
    with pytest.raises(ValueError, match=r"of \{GPU: 1\} each: .* room for 0 .*GPU 0"):
        EngineCore(EngineConfig.from_kwargs(str(model_dir), dtype="float32", device="cuda",
                                            kv_cache_memory=2**20, distributed_executor_backend="ray"),
                   model_dir, show_progress=False)
    assert time.monotonic() - start < 10
    assert set(ray.util.placement_group_table()) == before  # refused before any was made

    held = ray.util.placement_group([{"CPU": CLUSTER_CPUS - 1.0}])
    try:
        ray.get(held.ready(), timeout=30)
        monkeypatch.setenv(PER_WORKER_CPUS_ENV, "1")
        monkeypatch.setenv(PLACEMENT_TIMEOUT_ENV, "2")
        start = time.monotonic()
        with pytest.raises(ValueError, match=r"did not place 2 workers .* within 2 s: only CPU 1 is free"):
            _ray_core(model_dir, tensor_parallel_size=2)
        assert time.monotonic() - start < 10
        table = ray.util.placement_group_table()
        assert {table[pg]["state"] for pg in set(table) - before - {held.id.hex()}} == {"REMOVED"}
    finally:
        ray.util.remove_placement_group(held)


@pytest.mark.slow
def test_worker_start_up_error_reaches_the_engine(ray_client, tmp_path, monkeypatch):
    """A rank whose Worker cannot be built (a config.json without a model) answers with its traceback: the
    engine raises WorkerProcessError with it, and the actor and placement group are gone."""
    ray = ray_client
    (tmp_path / "config.json").write_text("{}")
    monkeypatch.setenv(PER_WORKER_CPUS_ENV, "1")
    before = set(ray.util.placement_group_table())
    with pytest.raises(WorkerProcessError, match=r"worker process failed \(rank 0\):\n.*Traceback"):
        _ray_core(tmp_path)
    table = ray.util.placement_group_table()
    assert {table[pg]["state"] for pg in set(table) - before} == {"REMOVED"}
