"""CUDA graphs for decode-only steps: capture the model's forward once per batch size, then replay.

A decode step of a small model launches hundreds of kernels that each run for microseconds; launching them
from Python costs more than running them. A captured graph replays the whole forward with one launch. A
graph replays fixed addresses, so its inputs live in persistent buffers that every step copies into, and a
batch is padded up to the next captured size:

    sizes   1, 2, 4, 8, then every 8 up to 256, then every 16, up to and including max_num_seqs
    padding rows n..padded get input id 0, position 0, slot -1 (reshape_and_cache skips it) and seq_len 0
            (paged decode attention returns zeros for it); their outputs are sliced off

Only the model forward (embedding -> final norm) is captured. Logits and sampling run eagerly on the rows
that sample, as before. Prefill and mixed steps run eagerly. The graph's attention is the Triton backend's
decode path, which reads lengths from device tensors only; the captured metadata sets max_decode_seq_len to
max_model_len so the split count, chosen at capture, holds for any length at replay.

How the model runner uses it (see docs/gpu.md):

    runner = CUDAGraphRunner(model, kv_caches, max_num_seqs, max_model_len, block_size, device)
    runner.capture()                       # after the KV cache is allocated; skip when enforce_eager
    hidden = runner(input_ids, positions, kv_caches, meta)   # replays when it can, else model(...)

Everything except capture() and replay runs on CPU tensors too, which is what the tests exercise
(use_graphs=False runs the model eagerly on the persistent buffers, padding included).
"""

from __future__ import annotations

import bisect
import logging
import time
from dataclasses import dataclass

import torch

from tokenmill.attention.backend import AttentionMetadata

logger = logging.getLogger("tokenmill")


def capture_sizes(max_num_seqs: int) -> list[int]:
    """Decode batch sizes to capture: 1, 2, 4, 8, every 8 to 256, every 16 above, and max_num_seqs itself."""
    if max_num_seqs < 1:
        raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
    sizes = {s for s in (1, 2, 4, 8) if s <= max_num_seqs}
    sizes.update(range(16, min(max_num_seqs, 256) + 1, 8))
    sizes.update(range(256 + 16, max_num_seqs + 1, 16))
    sizes.add(max_num_seqs)
    return sorted(sizes)


def padded_batch_size(num_seqs: int, sizes: list[int]) -> int | None:
    """The smallest captured size >= num_seqs (sizes sorted), or None when the batch is larger than all."""
    i = bisect.bisect_left(sizes, num_seqs)
    return sizes[i] if i < len(sizes) else None


def is_decode_only(meta: AttentionMetadata) -> bool:
    return not meta.prefill_indices and meta.num_tokens == meta.num_seqs


@dataclass
class DecodeInputBuffers:
    """Persistent inputs of the captured graphs; a graph of size b reads the first b rows of each."""

    input_ids: torch.Tensor  # [max_batch] int64
    positions: torch.Tensor  # [max_batch] int64
    slot_mapping: torch.Tensor  # [max_batch] int64, -1 on padding rows
    seq_lens: torch.Tensor  # [max_batch] int32, 0 on padding rows
    block_tables: torch.Tensor  # [max_batch, max_blocks_per_seq] int32
    query_start_loc: torch.Tensor  # [max_batch + 1] int32, 0..max_batch: one token per sequence
    rows: torch.Tensor  # [max_batch] int64, 0..max_batch - 1: the query row of decode i is i

    @classmethod
    def allocate(cls, max_batch: int, max_blocks_per_seq: int, device: torch.device | str) -> DecodeInputBuffers:
        return cls(
            input_ids=torch.zeros(max_batch, dtype=torch.int64, device=device),
            positions=torch.zeros(max_batch, dtype=torch.int64, device=device),
            slot_mapping=torch.full((max_batch,), -1, dtype=torch.int64, device=device),
            seq_lens=torch.zeros(max_batch, dtype=torch.int32, device=device),
            block_tables=torch.zeros((max_batch, max_blocks_per_seq), dtype=torch.int32, device=device),
            query_start_loc=torch.arange(max_batch + 1, dtype=torch.int32, device=device),
            rows=torch.arange(max_batch, dtype=torch.int64, device=device),
        )

    @property
    def max_batch(self) -> int:
        return self.input_ids.shape[0]

    def fill(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata, padded: int) -> None:
        """Copy a decode-only batch of meta.num_seqs rows in and pad it to ``padded`` rows.

        Block-table columns past the batch's width keep stale ids: attention reads only the blocks below
        seq_len, so they are never used.
        """
        n = meta.num_seqs
        if not n <= padded <= self.max_batch:
            raise ValueError(f"cannot pad a batch of {n} to {padded} rows in buffers of {self.max_batch}")
        width = meta.block_tables.shape[1]
        if width > self.block_tables.shape[1]:
            raise ValueError(f"block table of {width} blocks exceeds the {self.block_tables.shape[1]} "
                             "blocks per sequence that max_model_len allows")
        self.input_ids[:n].copy_(input_ids, non_blocking=True)
        self.positions[:n].copy_(positions, non_blocking=True)
        self.slot_mapping[:n].copy_(meta.slot_mapping, non_blocking=True)
        self.seq_lens[:n].copy_(meta.seq_lens, non_blocking=True)
        self.block_tables[:n, :width].copy_(meta.block_tables, non_blocking=True)
        if padded > n:
            self.input_ids[n:padded].zero_()
            self.positions[n:padded].zero_()
            self.slot_mapping[n:padded].fill_(-1)
            self.seq_lens[n:padded].zero_()

    def metadata(self, batch_size: int, max_model_len: int) -> AttentionMetadata:
        """Decode-only metadata over views of the buffers, as captured for ``batch_size``.

        The host-side lengths are upper bounds fixed at capture (max_model_len), not the step's lengths: the
        Triton decode path uses them only to choose its split count.
        """
        b = batch_size
        return AttentionMetadata(
            num_tokens=b,
            num_seqs=b,
            query_start_loc=self.query_start_loc[: b + 1],
            seq_lens=self.seq_lens[:b],
            block_tables=self.block_tables[:b],
            slot_mapping=self.slot_mapping[:b],
            max_query_len=1,
            max_seq_len=max_model_len,
            query_start_loc_list=list(range(b + 1)),
            seq_lens_list=[max_model_len] * b,
            prefill_indices=[],
            decode_indices=list(range(b)),
            decode_rows=self.rows[:b],
            decode_seq_lens=self.seq_lens[:b],
            decode_block_tables=self.block_tables[:b],
            max_decode_seq_len=max_model_len,
        )


class CUDAGraphRunner:
    """Runs the model forward of decode-only steps from captured graphs, and every other step eagerly.

    use_graphs=False keeps the buffer path (copy in, pad, run on the padded buffers, slice out) but runs the
    model eagerly instead of replaying: it needs no GPU and checks the padding logic in tests.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        kv_caches: list[torch.Tensor],
        max_num_seqs: int,
        max_model_len: int,
        block_size: int,
        device: torch.device | str,
        sizes: list[int] | None = None,
        use_graphs: bool = True,
    ) -> None:
        backend = getattr(model, "layers", [None])[0]
        backend_name = getattr(getattr(getattr(backend, "self_attn", None), "backend", None), "name", "triton")
        if backend_name != "triton":
            raise ValueError(f"CUDA graphs need the Triton attention backend, the model uses {backend_name!r}: "
                             "install triton or run with enforce_eager=True")
        self.model = model
        self.kv_caches = kv_caches
        self.max_model_len = max_model_len
        self.device = torch.device(device)
        self.sizes = sorted(sizes) if sizes is not None else capture_sizes(max_num_seqs)
        max_blocks_per_seq = -(-max_model_len // block_size)
        self.buffers = DecodeInputBuffers.allocate(self.sizes[-1], max_blocks_per_seq, self.device)
        self.use_graphs = use_graphs
        # batch size -> (graph, its output hidden states [batch size, hidden_size])
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.num_replays = 0

    @torch.inference_mode()
    def capture(self) -> float:
        """Capture one graph per size, largest first so that smaller graphs reuse its memory pool; returns
        the seconds it took. Call after the KV cache is allocated and before serving."""
        if not self.use_graphs:
            return 0.0
        if self.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, got {self.device}: use enforce_eager=True")
        start = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        buf = self.buffers
        for size in reversed(self.sizes):
            # A valid dummy batch: one cached token per row, nothing written (slot -1).
            buf.seq_lens[:size].fill_(1)
            buf.slot_mapping[:size].fill_(-1)
            meta = buf.metadata(size, self.max_model_len)
            # Warm-up outside the graph: Triton compiles, cuBLAS picks its kernels and allocates workspaces.
            self.model(buf.input_ids[:size], buf.positions[:size], self.kv_caches, meta)
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out = self.model(buf.input_ids[:size], buf.positions[:size], self.kv_caches, meta)
            self.graphs[size] = (graph, out)
        torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - start
        logger.info("captured %d CUDA graphs for decode batch sizes %d..%d in %.1f s",
                    len(self.sizes), self.sizes[0], self.sizes[-1], seconds)
        return seconds

    def can_replay(self, meta: AttentionMetadata) -> bool:
        return is_decode_only(meta) and meta.num_seqs <= self.sizes[-1]

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                 meta: AttentionMetadata) -> torch.Tensor:
        """The model's forward: final hidden states [num_tokens, hidden_size]. A replayed step returns a view
        of the graph's output, valid until the next replay."""
        if not self.can_replay(meta) or (self.use_graphs and not self.graphs):
            return self.model(input_ids, positions, kv_caches, meta)
        if kv_caches is not self.kv_caches and any(a is not b for a, b in zip(kv_caches, self.kv_caches)):
            raise ValueError("the graphs were captured with other KV cache tensors: capture again")
        n = meta.num_seqs
        padded = padded_batch_size(n, self.sizes)
        assert padded is not None  # can_replay checked the largest size
        self.buffers.fill(input_ids, positions, meta, padded)
        self.num_replays += 1
        if self.use_graphs:
            graph, out = self.graphs[padded]
            graph.replay()
        else:
            buf = self.buffers
            out = self.model(buf.input_ids[:padded], buf.positions[:padded], self.kv_caches,
                             buf.metadata(padded, self.max_model_len))
        return out[:n]
