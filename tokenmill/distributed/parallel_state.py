"""The process groups of one worker process, set up once from its rank, and the collectives the model uses.

Rank layout (as vLLM's): world_size = pipeline_parallel_size * tensor_parallel_size and
rank = pp_rank * tp_size + tp_rank, so the ranks of one pipeline stage are consecutive (one node's GPUs) and
the tensor-parallel group of stage p is ranks [p * tp, (p + 1) * tp); the pipeline group of tp rank t is
ranks t, t + tp, t + 2 tp, ... The output rank, whose sampled tokens the engine reads, is tp rank 0 of the last
stage.

A process that never calls init_distributed (one worker, world size 1) sees groups of size 1: every collective
is the identity and torch.distributed is never touched, so the single-process path neither changes nor slows.

Backends: gloo on CPU, nccl on CUDA; the default group is made over a TCP rendezvous
(distributed_init_method "tcp://127.0.0.1:PORT") with a finite timeout, so that a rank whose peer died raises
instead of waiting forever (the executor kills such ranks anyway, see tokenmill/worker/executor.py).
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

logger = logging.getLogger("tokenmill")

# Seconds a collective may wait for its peers before it fails (torch.distributed's process-group timeout).
DEFAULT_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class ParallelConfig:
    """Where one worker process sits in the world: what the executor tells each worker it starts."""

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    # "tcp://127.0.0.1:PORT": the default group's rendezvous (None with a world of one).
    distributed_init_method: str | None = None
    # "gloo" (CPU) or "nccl" (CUDA); None picks from the device.
    backend: str | None = None
    timeout_s: float = DEFAULT_TIMEOUT_S

    def __post_init__(self) -> None:
        tp, pp = self.tensor_parallel_size, self.pipeline_parallel_size
        if tp < 1 or pp < 1:
            raise ValueError(f"tensor_parallel_size={tp} and pipeline_parallel_size={pp} must be >= 1")
        if self.world_size != tp * pp:
            raise ValueError(f"world_size={self.world_size} must be tensor_parallel_size * pipeline_parallel_size "
                             f"= {tp * pp}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank={self.rank} is outside the world of {self.world_size} ranks")
        if self.world_size > 1 and not self.distributed_init_method:
            raise ValueError("a world of more than one rank needs a distributed_init_method ('tcp://host:port')")

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tensor_parallel_size

    @property
    def pp_rank(self) -> int:
        return self.rank // self.tensor_parallel_size

    @property
    def is_output_rank(self) -> bool:
        """tp rank 0 of the last pipeline stage: the rank whose sampled tokens the engine reads."""
        return self.tp_rank == 0 and self.pp_rank == self.pipeline_parallel_size - 1


def output_rank(tensor_parallel_size: int, pipeline_parallel_size: int) -> int:
    """The global rank of tp rank 0 of the last pipeline stage."""
    return (pipeline_parallel_size - 1) * tensor_parallel_size


def get_open_port() -> int:
    """A free TCP port on the loopback interface, for the default group's rendezvous."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class CollectiveTime:
    """Time spent in collectives: host seconds of synchronous ones (gloo), and CUDA event pairs of those queued
    on a GPU (NCCL), read once the device has passed them (seconds())."""

    host_seconds: float = 0.0
    events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = field(default_factory=list)

    def seconds(self) -> float:
        return self.host_seconds + sum(start.elapsed_time(end) for start, end in self.events) / 1e3


class _CollectiveTimer:
    """Accumulates the time of this process's collectives while enabled (the runner's step timing)."""

    def __init__(self) -> None:
        self.enabled = False
        self.current = CollectiveTime()

    @contextlib.contextmanager
    def time(self, x: torch.Tensor) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        if x.is_cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self.current.events.append((start, end))
        else:
            t0 = time.perf_counter()
            yield
            self.current.host_seconds += time.perf_counter() - t0

    def take(self) -> CollectiveTime:
        taken, self.current = self.current, CollectiveTime()
        return taken


_collective_timer = _CollectiveTimer()


def set_collective_timing(enabled: bool) -> None:
    """Time every collective of this process from now on (or stop); take_collective_time() reads and resets."""
    _collective_timer.enabled = bool(enabled)
    _collective_timer.current = CollectiveTime()


def take_collective_time() -> CollectiveTime:
    """The collectives' time since the last call (while set_collective_timing is on)."""
    return _collective_timer.take()


class GroupCoordinator:
    """One process group seen from one of its members: its global ranks, this process's place in it, and the
    collectives over it. A group of one does no communication at all."""

    def __init__(self, ranks: list[int], rank: int, group: dist.ProcessGroup | None, name: str) -> None:
        self.ranks = list(ranks)  # global ranks, in group order
        self.rank = rank  # this process's global rank
        self.rank_in_group = self.ranks.index(rank)
        self.world_size = len(self.ranks)
        self.group = group  # None for a group of one
        self.name = name

    def __repr__(self) -> str:
        return f"GroupCoordinator({self.name}, ranks={self.ranks}, rank_in_group={self.rank_in_group})"

    @property
    def is_first_rank(self) -> bool:
        return self.rank_in_group == 0

    @property
    def is_last_rank(self) -> bool:
        return self.rank_in_group == self.world_size - 1

    @property
    def next_rank(self) -> int:
        """The global rank after this one in the group (wrapping around)."""
        return self.ranks[(self.rank_in_group + 1) % self.world_size]

    @property
    def prev_rank(self) -> int:
        """The global rank before this one in the group (wrapping around)."""
        return self.ranks[(self.rank_in_group - 1) % self.world_size]

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of x over the group (in place when there is more than one rank)."""
        if self.world_size == 1:
            return x
        with _collective_timer.time(x):
            dist.all_reduce(x, group=self.group)
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Every rank's x concatenated along dim, in group order, on every rank."""
        if self.world_size == 1:
            return x
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        with _collective_timer.time(x):
            dist.all_gather(parts, x, group=self.group)
        return torch.cat(parts, dim=dim)

    def gather(self, x: torch.Tensor, dst: int = 0, dim: int = -1) -> torch.Tensor | None:
        """Every rank's x concatenated along dim on the group's rank `dst` (in group order); None elsewhere."""
        if self.world_size == 1:
            return x
        x = x.contiguous()
        if self.rank_in_group == dst:
            parts = [torch.empty_like(x) for _ in range(self.world_size)]
            with _collective_timer.time(x):
                dist.gather(x, parts, dst=self.ranks[dst], group=self.group)
            return torch.cat(parts, dim=dim)
        with _collective_timer.time(x):
            dist.gather(x, None, dst=self.ranks[dst], group=self.group)
        return None

    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        """x of the group's rank `src` on every rank (in place: x must have the same shape and dtype everywhere)."""
        if self.world_size == 1:
            return x
        with _collective_timer.time(x):
            dist.broadcast(x, src=self.ranks[src], group=self.group)
        return x

    def broadcast_object(self, obj: object = None, src: int = 0) -> object:
        """A picklable object of the group's rank `src` on every rank (for small host-side values)."""
        if self.world_size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=self.ranks[src], group=self.group)
        return box[0]

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier(group=self.group)

    # ---- point to point (pipeline stages) -------------------------------------------------------------------
    def send_tensor_dict(self, tensors: dict[str, torch.Tensor], dst: int | None = None) -> None:
        """Send a dict of tensors to the group's rank `dst` (default: the next rank): first their names,
        dtypes and shapes as one object, then each tensor."""
        if self.world_size == 1:
            raise RuntimeError(f"{self.name} group of one rank has no other rank to send to")
        peer = self.next_rank if dst is None else self.ranks[dst]
        meta = [(name, str(t.dtype).removeprefix("torch."), tuple(t.shape)) for name, t in tensors.items()]
        dist.send_object_list([meta], dst=peer, group=self.group)
        for t in tensors.values():
            dist.send(t.contiguous(), dst=peer, group=self.group)

    def recv_tensor_dict(self, src: int | None = None, device: torch.device | str = "cpu"
                         ) -> dict[str, torch.Tensor]:
        """Receive what send_tensor_dict sent from the group's rank `src` (default: the previous rank)."""
        if self.world_size == 1:
            raise RuntimeError(f"{self.name} group of one rank has no other rank to receive from")
        peer = self.prev_rank if src is None else self.ranks[src]
        box: list = [None]
        dist.recv_object_list(box, src=peer, group=self.group)
        out = {}
        for name, dtype, shape in box[0]:
            t = torch.empty(shape, dtype=getattr(torch, dtype), device=device)
            dist.recv(t, src=peer, group=self.group)
            out[name] = t
        return out

    def isend_tensors(self, tensors: list[torch.Tensor], dst: int | None = None) -> list[dist.Work]:
        """Start sending tensors to the group's rank `dst` (default: the next rank) and return at once: the
        works to wait on. The receiver must already know their shapes and dtypes (irecv_tensors), so nothing but
        the data travels. Each tensor must stay alive and unchanged until its work completes."""
        if self.world_size == 1:
            raise RuntimeError(f"{self.name} group of one rank has no other rank to send to")
        peer = self.next_rank if dst is None else self.ranks[dst]
        works = []
        for t in tensors:
            work = dist.isend(t.contiguous(), dst=peer, group=self.group)
            assert work is not None  # isend returns its work (None only for ranks outside the group)
            works.append(work)
        return works

    def irecv_tensors(self, tensors: list[torch.Tensor], src: int | None = None) -> list[dist.Work]:
        """Start receiving, into the given tensors, what isend_tensors sends from the group's rank `src` (default:
        the previous rank); returns the works to wait on before reading them. Messages from one rank are matched
        in the order they were sent."""
        if self.world_size == 1:
            raise RuntimeError(f"{self.name} group of one rank has no other rank to receive from")
        peer = self.prev_rank if src is None else self.ranks[src]
        works = []
        for t in tensors:
            if not t.is_contiguous():
                raise ValueError("irecv_tensors receives into contiguous tensors only")
            work = dist.irecv(t, src=peer, group=self.group)
            assert work is not None
            works.append(work)
        return works


@dataclass
class _State:
    config: ParallelConfig
    tp: GroupCoordinator
    pp: GroupCoordinator
    world: GroupCoordinator
    # The pipeline group's twin (same ranks) for what travels backwards, from a later stage to an earlier one
    # (the sampled ids): NCCL runs a communicator's operations between two ranks in the order they were issued,
    # so on one group a receive of ids posted early would hold back the activations sent after it.
    pp_reverse: GroupCoordinator


def _single_process_state() -> _State:
    config = ParallelConfig()
    return _State(config, GroupCoordinator([0], 0, None, "tp"), GroupCoordinator([0], 0, None, "pp"),
                  GroupCoordinator([0], 0, None, "world"), GroupCoordinator([0], 0, None, "pp_reverse"))


# This process's groups: set once by init_distributed (a worker process belongs to one world for its life).
_state: _State = _single_process_state()


def init_distributed(config: ParallelConfig, device: torch.device | None = None) -> None:
    """Join the world described by `config` and build its tensor- and pipeline-parallel groups. With a world of
    one nothing is initialised. Called once per worker process, before the model is built."""
    global _state
    if config.world_size == 1:
        _state = _single_process_state()
        return
    if dist.is_initialized():
        raise RuntimeError("torch.distributed is already initialised in this process: one worker per process")
    backend = config.backend or ("nccl" if device is not None and device.type == "cuda" else "gloo")
    timeout = datetime.timedelta(seconds=config.timeout_s)
    if device is not None and device.type == "cuda":
        torch.cuda.set_device(config.local_rank)
    dist.init_process_group(backend, init_method=config.distributed_init_method, world_size=config.world_size,
                            rank=config.rank, timeout=timeout)
    tp, pp = config.tensor_parallel_size, config.pipeline_parallel_size
    tp_groups = [list(range(p * tp, (p + 1) * tp)) for p in range(pp)]
    pp_groups = [list(range(t, config.world_size, tp)) for t in range(tp)]
    # new_group is collective: every rank creates every group, in the same order, and keeps its own.
    my_tp = my_pp = my_pp_reverse = None
    for ranks in tp_groups:
        group = dist.new_group(ranks, timeout=timeout, backend=backend) if len(ranks) > 1 else None
        if config.rank in ranks:
            my_tp = GroupCoordinator(ranks, config.rank, group, "tp")
    for ranks in pp_groups:
        group = dist.new_group(ranks, timeout=timeout, backend=backend) if len(ranks) > 1 else None
        if config.rank in ranks:
            my_pp = GroupCoordinator(ranks, config.rank, group, "pp")
    for ranks in pp_groups:
        group = dist.new_group(ranks, timeout=timeout, backend=backend) if len(ranks) > 1 else None
        if config.rank in ranks:
            my_pp_reverse = GroupCoordinator(ranks, config.rank, group, "pp_reverse")
    # every rank is in one group of each kind
    assert my_tp is not None and my_pp is not None and my_pp_reverse is not None
    world = GroupCoordinator(list(range(config.world_size)), config.rank, dist.group.WORLD, "world")
    _state = _State(config, my_tp, my_pp, world, my_pp_reverse)
    logger.info("rank %d of %d joined (tp rank %d of %d, pp rank %d of %d, %s)", config.rank, config.world_size,
                config.tp_rank, tp, config.pp_rank, pp, backend)


def destroy_distributed() -> None:
    """Leave the world (at worker shutdown); the process is back to a world of one."""
    global _state
    if dist.is_initialized():
        dist.destroy_process_group()
    _state = _single_process_state()


def get_parallel_config() -> ParallelConfig:
    return _state.config


def get_tp_group() -> GroupCoordinator:
    return _state.tp


def get_pp_group() -> GroupCoordinator:
    return _state.pp


def get_pp_reverse_group() -> GroupCoordinator:
    """The pipeline group's ranks again, in a group of their own, for messages from later stages to earlier ones."""
    return _state.pp_reverse


def get_world_group() -> GroupCoordinator:
    return _state.world


def get_tensor_model_parallel_rank() -> int:
    return _state.tp.rank_in_group


def get_tensor_model_parallel_world_size() -> int:
    return _state.tp.world_size


# ---- the collectives the model calls ----------------------------------------------------------------------


def tensor_model_parallel_all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum of x over the tensor-parallel group (the identity with one rank)."""
    return _state.tp.all_reduce(x)


def tensor_model_parallel_all_gather(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """x of every tensor-parallel rank concatenated along dim (the identity with one rank)."""
    return _state.tp.all_gather(x, dim)


def tensor_model_parallel_gather(x: torch.Tensor, dst: int = 0, dim: int = -1) -> torch.Tensor | None:
    """x of every tensor-parallel rank concatenated along dim on tp rank `dst`, None on the others."""
    return _state.tp.gather(x, dst, dim)


def tensor_model_parallel_broadcast(x: torch.Tensor, src: int = 0) -> torch.Tensor:
    """x of tp rank `src` on every tensor-parallel rank (in place)."""
    return _state.tp.broadcast(x, src)
