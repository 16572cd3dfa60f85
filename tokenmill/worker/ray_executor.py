"""RayDistributedExecutor (distributed_executor_backend="ray"): one Worker per rank, each in a Ray actor, so that
the ranks of tensor and pipeline parallelism can live on different nodes of a Ray cluster.

Start-up:
  1. Connect: to this process's Ray connection if it has one; else to the cluster at RAY_ADDRESS (an error if it
     cannot be reached); else to a cluster running on this machine (`ray start --head`, found as Ray's "auto");
     else start a local one for the engine (logged; stopped again at shutdown).
  2. Place: a placement group of world_size = tensor_parallel_size * pipeline_parallel_size bundles, {"GPU": 1}
     each on CUDA, {"CPU": n} each on the CPU, strategy PACK (as few nodes as hold them, so the ranks of a
     tensor-parallel group share a node when they fit while pipeline stages may span nodes). A cluster whose
     nodes cannot hold the bundles at all is refused at once; one whose resources are held by others is waited
     for up to TOKENMILL_RAY_PLACEMENT_TIMEOUT_S seconds, then refused, naming what is missing.
  3. One actor per bundle. Ranks follow the nodes (a node's actors get consecutive ranks, hence whole
     tensor-parallel groups); the local rank is the actor's index among its node's actors (on CUDA its GPU's
     index among the node's GPUs, all of which every actor of the node sees). The rendezvous is the rank-0
     actor's node IP and a port free there. Every actor then builds its Worker (joining the process groups).

Steps: each request of the executor ([method, argument], msgpack, serial.py) goes to every actor as the argument
of one actor method call, and Ray runs one caller's calls on an actor in the order they were made. A step is one
call per rank: the actor launches it and collects it (its runner appends the sampled tokens to its own state);
launch only submits the calls and keeps their object refs, collect waits for the oldest step's refs. So async
scheduling keeps the engine scheduling step N+1 while the actors run step N, and a step costs one actor call
per rank rather than two (a Ray call costs ~1 ms of host time on a busy 2-core machine, a pipe message ~0.1 ms:
BENCHMARKS.md). What it gives up, on CUDA: an actor builds step N+1's batch after step N has finished on the
device, not while it runs. The answer that counts comes from the output rank, the others are checked.

Failures: an actor that dies (its process killed, its node lost) fails its pending calls with RayActorError;
the executor then kills every actor (the survivors may be blocked in a collective with the dead one), removes
the placement group and raises WorkerProcessError. Shutdown kills the actors and removes the placement group; it
disconnects from a cluster it connected to and stops one it started, never one it did not start.

Environment:
  RAY_ADDRESS                          the cluster to join ("host:port" of its head node)
  TOKENMILL_RAY_PER_WORKER_CPUS        CPUs of each rank's bundle, and its torch threads (default on the CPU: the
                                       most that still place every rank on the cluster's nodes; on CUDA: none,
                                       the bundle is one GPU)
  TOKENMILL_RAY_PLACEMENT_TIMEOUT_S    seconds to wait for the placement group (default 300)

Every node needs tokenmill installed and the model at the same path (as vLLM requires).
"""

from __future__ import annotations

import logging
import os
import re
import socket
import time
import traceback
import weakref
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenmill.config import EngineConfig
from tokenmill.model.default_model import pid_alive
from tokenmill.outputs import ModelRunnerOutput, SchedulerOutput
from tokenmill.worker.executor import (
    RANK_FACT_KEYS,
    Executor,
    WorkerInfo,
    WorkerLaunchError,
    WorkerProcessError,
    WorkerRequestHandler,
    _GrammarCompiler,
)
from tokenmill.worker.serial import MsgpackDecoder, MsgpackEncoder
from tokenmill.worker.worker import KVCacheSizing

logger = logging.getLogger("tokenmill")

PER_WORKER_CPUS_ENV = "TOKENMILL_RAY_PER_WORKER_CPUS"
PLACEMENT_TIMEOUT_ENV = "TOKENMILL_RAY_PLACEMENT_TIMEOUT_S"
DEFAULT_PLACEMENT_TIMEOUT_S = 300.0
# Seconds between log lines while the placement group waits for resources.
_PLACEMENT_LOG_INTERVAL_S = 10.0
# Seconds a rank's failure waits for Ray to report a peer's death, its likely cause.
_DEATH_REPORT_GRACE_S = 5.0
# Seconds shutdown waits for killed actors' processes on this node to exit.
_ACTOR_EXIT_TIMEOUT_S = 10.0


def import_ray() -> Any:
    """The ray module, or an ImportError that says how to install it."""
    try:
        import ray
    except ImportError as e:
        raise ImportError(
            "distributed_executor_backend='ray' needs Ray, which is not installed: pip install ray (or pip "
            "install 'tokenmill[ray]'), or use distributed_executor_backend='mp' on one machine"
        ) from e
    return ray


def per_worker_cpus_from_env() -> int | None:
    """TOKENMILL_RAY_PER_WORKER_CPUS as a positive integer, or None when unset."""
    value = os.environ.get(PER_WORKER_CPUS_ENV, "").strip()
    if not value:
        return None
    try:
        cpus = int(value)
    except ValueError:
        cpus = 0
    if cpus < 1:
        raise ValueError(f"{PER_WORKER_CPUS_ENV}={value!r} must be a positive integer (the CPUs, and torch threads, "
                         "of each rank's Ray actor)")
    return cpus


def placement_timeout_from_env() -> float:
    """TOKENMILL_RAY_PLACEMENT_TIMEOUT_S as positive seconds (DEFAULT_PLACEMENT_TIMEOUT_S when unset)."""
    value = os.environ.get(PLACEMENT_TIMEOUT_ENV, "").strip()
    if not value:
        return DEFAULT_PLACEMENT_TIMEOUT_S
    try:
        seconds = float(value)
    except ValueError:
        seconds = 0.0
    if not seconds > 0:
        raise ValueError(f"{PLACEMENT_TIMEOUT_ENV}={value!r} must be a positive number of seconds (how long to "
                         "wait for the Ray cluster to place the workers)")
    return seconds


def workers_per_node(node_resources: dict[str, float], bundle: dict[str, float]) -> int:
    """How many bundles one node's resources hold."""
    return int(min(node_resources.get(name, 0.0) // amount for name, amount in bundle.items() if amount > 0))


def default_cpus_per_worker(node_cpus: list[float], world_size: int) -> int:
    """The most CPUs per rank for which world_size bundles still fit on nodes with these CPUs (at least 1)."""
    for cpus in range(int(max(node_cpus, default=1)), 1, -1):
        if sum(int(n // cpus) for n in node_cpus) >= world_size:
            return cpus
    return 1


def check_cluster_fits(nodes: dict[str, dict[str, float]], bundle: dict[str, float], world_size: int,
                       parallel: str) -> None:
    """ValueError unless the nodes (node IP -> total resources) can hold world_size copies of the bundle at all,
    naming what the cluster has and what to change."""
    room = sum(workers_per_node(resources, bundle) for resources in nodes.values())
    if room >= world_size:
        return
    names = sorted(bundle)
    have = "; ".join(f"{ip}: " + ", ".join(f"{name} {resources.get(name, 0.0):g}" for name in names)
                     for ip, resources in sorted(nodes.items()))
    fixes = "add nodes or resources to the cluster, or lower the parallel sizes"
    if "CPU" in bundle:
        fixes += f", or lower {PER_WORKER_CPUS_ENV}"
    raise ValueError(
        f"the Ray cluster cannot hold {world_size} workers ({parallel}) of {_format(bundle)} each: its "
        f"{len(nodes)} node(s) have room for {room} ({have or 'no alive node'}): {fixes}"
    )


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """ConnectionError, at once, when RAY_ADDRESS is a "host:port" that accepts no TCP connection (ray.init would
    retry it for minutes)."""
    match = re.fullmatch(r"\[?([^\[\]/]+?)\]?:(\d+)", address)
    if match is None:  # "auto", "ray://...": Ray's own forms
        return
    try:
        with socket.create_connection((match.group(1), int(match.group(2))), timeout=timeout):
            pass
    except OSError as e:
        raise ConnectionError(_unreachable(address, e)) from e


def _unreachable(address: str, error: BaseException) -> str:
    return (f"cannot connect to the Ray cluster at RAY_ADDRESS={address!r} ({error}): start it (`ray start --head` "
            "on its head node) or unset RAY_ADDRESS to start a local one")


def _format(resources: dict[str, float]) -> str:
    return "{" + ", ".join(f"{name}: {amount:g}" for name, amount in sorted(resources.items())) + "}"


@dataclass(frozen=True)
class RankPlacement:
    """One rank's actor (its index in the placement group's bundles), its local rank on its node, and the
    environment it needs there."""

    actor_index: int
    local_rank: int
    env: dict[str, str]


def place_ranks(infos: list[dict[str, Any]]) -> list[RankPlacement]:
    """Ranks for actors located by RayWorkerActor.node_info (in bundle order), rank order first: ranks follow the
    nodes (in the order of their first bundle), so a node's actors get consecutive ranks (whole tensor-parallel
    groups where they fit). Local rank: the actor's index among its node's actors; with GPUs, its GPU's index
    among the node's GPUs, which every actor of the node then sees (CUDA_VISIBLE_DEVICES), as process groups
    over NCCL need the peers' devices visible."""
    node_order: dict[str, int] = {}
    for info in infos:
        node_order.setdefault(info["node_id"], len(node_order))
    order = sorted(range(len(infos)), key=lambda i: (node_order[infos[i]["node_id"]], i))
    node_gpus: dict[str, list[str]] = {}
    for info in infos:
        node_gpus.setdefault(info["node_id"], []).extend(info["gpu_ids"])
    placements = []
    seen: dict[str, int] = {}  # node id -> its actors placed so far
    for i in order:
        node, gpu_ids = infos[i]["node_id"], infos[i]["gpu_ids"]
        env: dict[str, str] = {}
        local_rank = seen.get(node, 0)
        if gpu_ids:
            gpus = sorted(node_gpus[node], key=_gpu_sort_key)
            env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
            local_rank = gpus.index(gpu_ids[0])
        seen[node] = seen.get(node, 0) + 1
        placements.append(RankPlacement(i, local_rank, env))
    return placements


class RayWorkerActor:
    """One rank in a Ray actor: holds its Worker and answers the executor's msgpack requests with
    ["ok", value] or ["error", traceback] (launch with None: a failed launch is reported by the next answer)."""

    def __init__(self) -> None:
        self._encoder = MsgpackEncoder()
        self._decoder = MsgpackDecoder()
        self._handler: WorkerRequestHandler | None = None

    def node_info(self) -> dict[str, Any]:
        """Where this actor runs: Ray node id and IP, its GPU ids, its process id, its actor id."""
        import ray

        context = ray.get_runtime_context()
        return {"node_id": context.get_node_id(), "node_ip": ray.util.get_node_ip_address(),
                "gpu_ids": [str(i) for i in ray.get_gpu_ids()], "pid": os.getpid(),
                "actor_id": context.get_actor_id()}

    def free_port(self) -> int:
        """A TCP port free on this node (the rank-0 actor's: the process groups' rendezvous)."""
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("", 0))
            return int(s.getsockname()[1])

    def init_worker(self, config: EngineConfig, model_dir: str, rank: int, local_rank: int,
                    distributed_init_method: str | None, env: dict[str, str],
                    num_cpu_threads: int | None) -> list[Any]:
        """Build this rank's Worker; ["ok", WorkerInfo] or ["error", traceback]."""
        try:
            os.environ.update(env)  # CUDA_VISIBLE_DEVICES, before anything initializes CUDA
            from tokenmill.worker.worker import Worker

            compiler = _GrammarCompiler(config, Path(model_dir))
            worker = Worker(config, Path(model_dir), show_progress=False, grammar_factory=compiler, rank=rank,
                            local_rank=local_rank, distributed_init_method=distributed_init_method,
                            num_cpu_threads=num_cpu_threads)
            compiler.vocab_size = worker.spec.vocab_size
            self._handler = WorkerRequestHandler(worker)
            return ["ok", WorkerInfo.of(worker)]
        except Exception:
            return ["error", traceback.format_exc()]

    def execute(self, message: bytes) -> bytes | None:
        """One request ([method, argument] in msgpack); the encoded answer, None for launch."""
        try:
            method, argument = self._decoder.decode(message)
            if self._handler is None:
                raise RuntimeError("the worker is not built: init_worker failed or was not called")
            if method == "step":  # launch, then collect that step: one call per step (see the module docstring)
                self._handler.execute("launch", argument)
                method, argument = "collect", None
            value = self._handler.execute(method, argument)
            if value is WorkerRequestHandler.NO_ANSWER:
                return None
            if method == "engine_facts":
                import torch

                value = {**value, **self.node_info(), "num_cpu_threads": torch.get_num_threads()}
            return self._encoder.encode(["ok", value])
        except WorkerLaunchError as e:
            return self._encoder.encode(["error", str(e)])
        except Exception:
            return self._encoder.encode(["error", traceback.format_exc()])


class RayDistributedExecutor(Executor):
    """world_size Workers in Ray actors of one placement group (see the module's docstring)."""

    def __init__(self, config: EngineConfig, model_dir: Path) -> None:
        from tokenmill.distributed import output_rank

        ray = import_ray()
        self._ray = ray
        self.world_size = config.world_size
        self.output_rank = output_rank(config.tensor_parallel_size, config.pipeline_parallel_size)
        self._parallel = (f"tensor_parallel_size={config.tensor_parallel_size} x "
                          f"pipeline_parallel_size={config.pipeline_parallel_size}")
        self._encoder = MsgpackEncoder()
        self._decoder = MsgpackDecoder()
        self._failed: str | None = None
        self._actors: list[Any] = []
        self._nodes: list[dict[str, Any]] = []  # rank -> where its actor runs (RayWorkerActor.node_info)
        # Object refs of the launched steps not collected yet, oldest first (one ref per rank).
        self._launched: deque[list[Any]] = deque()
        # What shutdown (or the finalizer of an executor dropped without it) releases.
        self._resources: dict[str, Any] = {"actors": [], "placement_group": None, "disconnect": False,
                                           "started_cluster": False, "local_pids": []}
        weakref.finalize(self, _release, ray, self._resources)
        placement_timeout = placement_timeout_from_env()
        per_worker_cpus = per_worker_cpus_from_env()
        self._connect()
        try:
            self._start(config, model_dir, per_worker_cpus, placement_timeout)
        except BaseException:
            _release(ray, self._resources)
            raise

    # ---- start-up -----------------------------------------------------------------------------------------
    def _connect(self) -> None:
        ray = self._ray
        if ray.is_initialized():
            logger.info("Ray: using this process's connection to the cluster at %s",
                        ray.get_runtime_context().gcs_address)
            return
        address = os.environ.get("RAY_ADDRESS", "").strip()
        if address:
            check_reachable(address)
        try:
            ray.init(address=address or "auto", logging_level=logging.WARNING)
        except ConnectionError as e:
            if address:
                raise ConnectionError(_unreachable(address, e)) from e
            logger.info("Ray: no running cluster found (RAY_ADDRESS unset, none started on this machine): "
                        "starting a local one for this engine; it stops with the engine")
            ray.init(include_dashboard=False, logging_level=logging.WARNING)
            self._resources["started_cluster"] = True
        self._resources["disconnect"] = True
        logger.info("Ray: connected to the cluster at %s", ray.get_runtime_context().gcs_address)

    def _bundle(self, config: EngineConfig, per_worker_cpus: int | None,
                nodes: dict[str, dict[str, float]]) -> dict[str, float]:
        if config.model.device == "cuda":
            bundle = {"GPU": 1.0}
            if per_worker_cpus is not None:
                bundle["CPU"] = float(per_worker_cpus)
            return bundle
        if per_worker_cpus is None:
            per_worker_cpus = default_cpus_per_worker([r.get("CPU", 0.0) for r in nodes.values()],
                                                      self.world_size)
        return {"CPU": float(per_worker_cpus)}

    def _start(self, config: EngineConfig, model_dir: Path, per_worker_cpus: int | None,
               placement_timeout: float) -> None:
        ray = self._ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        # "IP (node id)" -> the node's total resources
        nodes = {f"{n['NodeManagerAddress']} ({n['NodeID'][:8]})": n["Resources"] for n in ray.nodes() if n["Alive"]}
        bundle = self._bundle(config, per_worker_cpus, nodes)
        check_cluster_fits(nodes, bundle, self.world_size, self._parallel)
        placement_group = ray.util.placement_group([dict(bundle) for _ in range(self.world_size)],
                                                   strategy="PACK")
        self._resources["placement_group"] = placement_group
        self._wait_for_placement(placement_group, bundle, placement_timeout)

        actor_class = ray.remote(RayWorkerActor)
        num_cpus = bundle.get("CPU", 0.0)
        actors = [
            actor_class.options(
                num_cpus=num_cpus, num_gpus=bundle.get("GPU", 0.0),
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=placement_group, placement_group_bundle_index=i),
            ).remote()
            for i in range(self.world_size)
        ]
        self._resources["actors"] = actors
        infos = self._gather([a.node_info.remote() for a in actors], wrapped=False)

        placements = place_ranks(infos)
        self._actors = [actors[p.actor_index] for p in placements]
        self._nodes = [infos[p.actor_index] for p in placements]
        self._resources["actors"] = self._actors
        driver_node = ray.get_runtime_context().get_node_id()
        self._resources["local_pids"] = [n["pid"] for n in self._nodes if n["node_id"] == driver_node]
        init_method = None
        if self.world_size > 1:
            port = self._gather([self._actors[0].free_port.remote()], wrapped=False)[0]
            init_method = f"tcp://{self._nodes[0]['node_ip']}:{port}"
        threads = int(num_cpus) if config.model.device != "cuda" or per_worker_cpus is not None else None
        refs = [actor.init_worker.remote(config, str(model_dir), rank, p.local_rank, init_method, p.env, threads)
                for rank, (actor, p) in enumerate(zip(self._actors, placements, strict=True))]
        self.info: WorkerInfo = self._gather(refs)[self.output_rank]
        logger.info("Ray: %d workers (%s), %s each, on %d node(s): %s", self.world_size, self._parallel,
                    _format(bundle), len({n["node_id"] for n in self._nodes}),
                    ", ".join(f"rank {r} on {n['node_ip']} (pid {n['pid']})" for r, n in enumerate(self._nodes)))

    def _wait_for_placement(self, placement_group: Any, bundle: dict[str, float], timeout: float) -> None:
        """Wait until the cluster grants the placement group; ValueError after timeout seconds."""
        ray = self._ray
        ready = placement_group.ready()
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            done, _ = ray.wait([ready], timeout=max(0.0, min(remaining, _PLACEMENT_LOG_INTERVAL_S)))
            if done:
                return
            available = ray.available_resources()
            have = ", ".join(f"{name} {available.get(name, 0.0):g}" for name in sorted(bundle))
            if time.monotonic() >= deadline:
                raise ValueError(
                    f"the Ray cluster did not place {self.world_size} workers ({self._parallel}) of {_format(bundle)} "
                    f"each within {timeout:g} s: only {have} is free (other jobs or placement groups hold the rest): "
                    f"free them, add nodes, or wait longer ({PLACEMENT_TIMEOUT_ENV})"
                )
            logger.info("Ray: waiting for %d bundles of %s (free now: %s)", self.world_size, _format(bundle), have)

    # ---- requests -----------------------------------------------------------------------------------------
    def _submit(self, method: str, argument: Any = None) -> list[Any]:
        """Send one request to every rank; its object refs, in rank order."""
        if self._failed is not None:
            raise WorkerProcessError(self._failed)
        message = self._encoder.encode([method, argument])
        return [actor.execute.remote(message) for actor in self._actors]

    def _gather(self, refs: list[Any], wrapped: bool = True) -> list[Any]:
        """The values of refs (one per rank, in rank order), decoded when wrapped (["ok", value]); on a failed
        or dead rank, every actor is killed and WorkerProcessError raised. Refs are taken as they complete, so a
        dead rank is reported even while its peers wait for it in a collective."""
        ray = self._ray
        pending = {ref: i for i, ref in enumerate(refs)}  # ref -> its index in refs
        values: dict[int, Any] = {}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                index = pending.pop(ref)
                rank = index % self.world_size  # refs may hold several requests' refs, each in rank order
                try:
                    value = ray.get(ref)
                except ray.exceptions.RayActorError as e:
                    raise self._fail(self._died(rank, e)) from None
                except ray.exceptions.RayError as e:
                    raise self._fail(f"the worker actor failed (rank {rank}): {e}") from None
                if wrapped and value is not None:
                    status, value = value if isinstance(value, list) else self._decoder.decode(value)
                    if status != "ok":
                        # A peer that died makes the survivors' collectives fail at once (connection closed),
                        # often before Ray reports the death: report the death, the cause, if it comes.
                        death = self._death_among(pending, _DEATH_REPORT_GRACE_S)
                        failed = f"the worker process failed (rank {rank}):\n{value}"
                        raise self._fail(f"{death}; then {failed}" if death else failed)
                values[index] = value
        return [values[i] for i in range(len(refs))]

    def _died(self, index: int, error: BaseException) -> str:
        rank = index % self.world_size
        where = f", pid {self._nodes[rank]['pid']} on {self._nodes[rank]['node_ip']}" if self._nodes else ""
        return f"the worker process died (rank {rank}{where}): {_first_line(error)}"

    def _death_among(self, pending: dict[Any, int], timeout: float) -> str | None:
        """The death of a rank among the pending refs (ref -> index) reported within timeout seconds, if any."""
        ray = self._ray
        refs = list(pending)
        deadline = time.monotonic() + timeout
        while refs:
            done, refs = ray.wait(refs, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not done:
                return None
            try:
                ray.get(done[0])
            except ray.exceptions.RayActorError as e:
                return self._died(pending[done[0]], e)
            except ray.exceptions.RayError:
                pass
        return None

    def _fail(self, message: str) -> WorkerProcessError:
        """Kill every actor (survivors may be blocked in a collective with the dead one) and remove the placement
        group; the error to raise, raised again by later calls."""
        self._failed = message
        _release_actors(self._ray, self._resources)
        return WorkerProcessError(message)

    def _call(self, method: str, argument: Any = None) -> list[Any]:
        return self._gather(self._submit(method, argument))

    # ---- the executor contract ----------------------------------------------------------------------------
    def determine_kv_cache_sizing(self) -> KVCacheSizing:
        """The blocks every rank can hold: the smallest count over the ranks."""
        sizings: list[KVCacheSizing] = self._call("determine_kv_cache_sizing")
        ours = sizings[self.output_rank]
        return KVCacheSizing(ours.bytes_per_block, min(s.num_blocks for s in sizings), ours.block_size)

    def initialize_cache(self, num_blocks: int, max_model_len: int) -> None:
        self._call("initialize_cache", [num_blocks, max_model_len])

    def launch(self, sched: SchedulerOutput) -> None:
        """Submit the step to every actor (launch and collect there, in one call); returns at once."""
        self._launched.append(self._submit("step", sched))

    def collect(self) -> ModelRunnerOutput:
        """The output rank's answer to the oldest launched step, waiting for it."""
        if not self._launched:
            raise RuntimeError("collect() without a launched step")
        return self._gather(self._launched.popleft())[self.output_rank]

    def engine_facts(self) -> dict:
        """The output rank's facts, with every rank's place (node IP, pid, Ray actor id, CPU threads) and memory
        under "ranks"."""
        facts = self._call("engine_facts")
        out = dict(facts[self.output_rank])
        keys = (*RANK_FACT_KEYS, "node_ip", "pid", "actor_id", "num_cpu_threads")
        out["ranks"] = [{key: f[key] for key in keys} for f in facts]
        return out

    def set_step_timing(self, enabled: bool) -> None:
        self._call("set_step_timing", bool(enabled))

    @property
    def placement_group(self) -> Any:
        """The Ray placement group of the workers (None once removed)."""
        return self._resources["placement_group"]

    def shutdown(self) -> None:
        _release(self._ray, self._resources)


def _release_actors(ray: Any, resources: dict[str, Any]) -> None:
    """Kill the actors and remove the placement group (idempotent); wait for the actors' processes on this node
    to exit."""
    actors, resources["actors"] = resources["actors"], []
    placement_group, resources["placement_group"] = resources["placement_group"], None
    if not ray.is_initialized():
        return
    for actor in actors:
        try:
            ray.kill(actor, no_restart=True)
        except Exception as e:  # already gone with its cluster
            logger.debug("Ray: killing a worker actor: %s", e)
    if placement_group is not None:
        try:
            ray.util.remove_placement_group(placement_group)
        except Exception as e:
            logger.debug("Ray: removing the placement group: %s", e)
    _wait_for_exit(resources.pop("local_pids", []), _ACTOR_EXIT_TIMEOUT_S)


def _release(ray: Any, resources: dict[str, Any]) -> None:
    """Release the actors and placement group, then disconnect from the cluster if this executor connected
    (ray.shutdown: which also stops the local cluster it started)."""
    _release_actors(ray, resources)
    if resources.get("disconnect") and ray.is_initialized():
        resources["disconnect"] = False
        if resources.get("started_cluster"):
            logger.info("Ray: stopping the local cluster started for this engine")
        ray.shutdown()


def _wait_for_exit(pids: list[int], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for pid in pids:
        while time.monotonic() < deadline and pid_alive(pid):
            time.sleep(0.05)


def _gpu_sort_key(gpu_id: str) -> tuple[int, str]:
    return (int(gpu_id), "") if gpu_id.isdigit() else (1 << 30, gpu_id)


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return " ".join(lines[:2]) if lines else type(error).__name__
