"""Turns the logits of a mixed batch into one token per request, each with its own sampling settings.

Order per row (as vLLM): raw logprobs for reporting -> penalties -> min_tokens mask -> greedy argmax, or
temperature -> top-k -> top-p -> min-p -> a draw. A draw is argmax(probs / q) with q ~ Exp(1) (equivalent to
sampling from probs); a seeded request draws q from its own generator so its text does not depend on the
rest of the batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from tokenmill.kernels.cpu import ops as cpu_kernels
from tokenmill.outputs import Logprob, PositionLogprobs, SampledToken
from tokenmill.request import Request

if TYPE_CHECKING:
    from tokenmill.structured_output.bitmask import TokenBitmaskBuffer


def top_logprobs(logprobs: torch.Tensor, token_ids: torch.Tensor, k: int) -> list[PositionLogprobs]:
    """For each row of logprobs [rows, vocab]: the given token and the k most likely, with 1-based ranks."""
    return logprob_entries(*logprob_tensors(logprobs, token_ids, k))


def logprob_tensors(logprobs: torch.Tensor, token_ids: torch.Tensor, k: int) -> tuple[torch.Tensor, ...]:
    """The device half of top_logprobs: (token ids, their logprobs, their ranks[, top-k values, top-k ids])."""
    chosen = logprobs.gather(1, token_ids[:, None])[:, 0]
    ranks = (logprobs > chosen[:, None]).sum(dim=1) + 1
    if k <= 0:
        return token_ids, chosen, ranks
    top_vals, top_ids = logprobs.topk(k, dim=1)
    return token_ids, chosen, ranks, top_vals, top_ids


def logprob_entries(token_ids: torch.Tensor, chosen: torch.Tensor, ranks: torch.Tensor,
                    top_vals: torch.Tensor | None = None, top_ids: torch.Tensor | None = None) -> list[PositionLogprobs]:
    """The host half of top_logprobs, from the tensors of logprob_tensors."""
    chosen_l, ranks_l, ids_l = chosen.tolist(), ranks.tolist(), token_ids.tolist()
    top_vals_l = top_vals.tolist() if top_vals is not None else []
    top_ids_l = top_ids.tolist() if top_ids is not None else None
    out = []
    for row in range(len(ids_l)):
        entry = {ids_l[row]: Logprob(chosen_l[row], ranks_l[row])}
        if top_ids_l is not None:
            for rank, (tok, val) in enumerate(zip(top_ids_l[row], top_vals_l[row], strict=True), start=1):
                if tok not in entry:
                    entry[tok] = Logprob(val, rank)
        out.append(entry)
    return out


@dataclass
class SamplerOutput:
    """What one sampling call leaves on the logits' device; `to_host` turns it into one SampledToken per row.

    Between the two, the tensors can travel to the host without a stop of the device (`map_tensors`), which is
    how async scheduling overlaps a step's output work with the next step."""

    token_ids: torch.Tensor  # [rows] int64
    # With logprobs: the rows that asked, logprob_tensors() of those rows, and how many each asked for.
    logprob_rows: list[int] = field(default_factory=list)
    logprob_data: tuple[torch.Tensor, ...] = ()
    k_per_row: list[int] = field(default_factory=list)

    def map_tensors(self, fn) -> SamplerOutput:
        return SamplerOutput(fn(self.token_ids), self.logprob_rows, tuple(fn(t) for t in self.logprob_data),
                             self.k_per_row)

    def to_host(self) -> list[SampledToken]:
        ids = self.token_ids.tolist()
        out = [SampledToken(t) for t in ids]
        if self.logprob_rows:
            entries = logprob_entries(*self.logprob_data)
            for row, k, entry in zip(self.logprob_rows, self.k_per_row, entries, strict=True):
                kept = {t: lp for t, lp in entry.items() if t == ids[row] or lp.rank <= k}
                out[row] = SampledToken(ids[row], kept, entry[ids[row]].logprob)
        return out


class Sampler:
    def __init__(self, generator: torch.Generator) -> None:
        # Draws for requests without a seed of their own.
        self.generator = generator
        # Token bitmasks of the constrained rows (structured outputs), allocated on first use.
        self.bitmask: TokenBitmaskBuffer | None = None

    def sample(self, logits: torch.Tensor, requests: list[Request]) -> SamplerOutput:
        """logits: [num_requests, vocab] at the position that predicts each request's next token, in the model's
        dtype. A batch of greedy rows is argmax'ed as it is (a bfloat16 -> float32 conversion is exact and keeps
        the order); anything else computes in float32. Nothing waits for the device here."""
        device = logits.device
        params = [r.sampling_params for r in requests]
        max_logprobs = max((p.logprobs for p in params if p.logprobs is not None), default=None)
        if max_logprobs is not None or any(p.needs_penalties or not p.greedy for p in params):
            logits = logits.float()
        raw_logprobs = torch.log_softmax(logits, dim=-1) if max_logprobs is not None else None

        if any(p.needs_penalties for p in params):
            logits = self._apply_penalties(logits.clone(), requests)
        logits = self._mask_min_tokens(logits, requests)
        logits = self._apply_grammars(logits, requests)

        greedy = [i for i, p in enumerate(params) if p.greedy]
        random = [i for i, p in enumerate(params) if not p.greedy]
        if not random:
            token_ids = cpu_kernels.argmax(logits)
        else:
            token_ids = torch.empty(len(requests), dtype=torch.long, device=device)
        if greedy and random:
            idx = torch.tensor(greedy, device=device)
            token_ids[idx] = cpu_kernels.argmax(logits[idx])
        if random:
            idx = torch.tensor(random, device=device)
            token_ids[idx] = self._sample(logits[idx], [requests[i] for i in random])

        out = SamplerOutput(token_ids)
        if raw_logprobs is not None and max_logprobs is not None:
            k_of_row = {i: p.logprobs for i, p in enumerate(params) if p.logprobs is not None}
            rows = list(k_of_row)
            idx = torch.tensor(rows, device=device)
            out.logprob_rows = rows
            out.logprob_data = logprob_tensors(raw_logprobs[idx], token_ids[idx], max_logprobs)
            out.k_per_row = list(k_of_row.values())
        return out

    def _apply_grammars(self, logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        """Forbid the tokens each constrained row's grammar does not allow next (one bitmask, one kernel for all
        such rows); rows without a grammar are untouched."""
        matchers = [r.structured_output.matcher if r.structured_output is not None else None for r in requests]
        if not any(m is not None for m in matchers):
            return logits
        if self.bitmask is None or self.bitmask.vocab_size != logits.shape[1]:
            from tokenmill.structured_output.bitmask import TokenBitmaskBuffer

            self.bitmask = TokenBitmaskBuffer(len(requests), logits.shape[1], logits_dtype=logits.dtype)
        rows = self.bitmask.fill(matchers)  # grows with the batch
        # In place: these logits are this step's own (the model's fresh output, or a converted copy).
        self.bitmask.apply(logits, rows)
        return logits

    def _apply_penalties(self, logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        num_rows, vocab = logits.shape
        device = logits.device
        counts = torch.zeros(num_rows, vocab, device=device)
        prompt_mask = torch.zeros(num_rows, vocab, dtype=torch.bool, device=device)
        for row, r in enumerate(requests):
            if not r.sampling_params.needs_penalties:
                continue
            if r.output_token_ids:
                out_ids = torch.tensor(r.output_token_ids, device=device)
                counts[row].index_add_(0, out_ids, torch.ones(len(r.output_token_ids), device=device))
            if r.sampling_params.repetition_penalty != 1.0:
                prompt_mask[row, torch.tensor(r.prompt_token_ids, device=device)] = True
        rep = torch.tensor([r.sampling_params.repetition_penalty for r in requests], device=device)[:, None]
        freq = torch.tensor([r.sampling_params.frequency_penalty for r in requests], device=device)[:, None]
        pres = torch.tensor([r.sampling_params.presence_penalty for r in requests], device=device)[:, None]
        seen = prompt_mask | (counts > 0)
        # Repetition penalty (CTRL paper): shrink the logits of every token already seen, whatever its sign.
        logits = torch.where(seen, torch.where(logits > 0, logits / rep, logits * rep), logits)
        logits = logits - freq * counts - pres * (counts > 0).float()
        return logits

    def _mask_min_tokens(self, logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        rows, cols = [], []
        for row, r in enumerate(requests):
            p = r.sampling_params
            if r.num_output_tokens < p.min_tokens:
                banned = set(p.stop_token_ids or [])
                if not p.ignore_eos:
                    banned |= r.eos_token_ids
                for tok in banned:
                    if tok < logits.shape[1]:
                        rows.append(row)
                        cols.append(tok)
        if rows:
            logits = logits.clone()
            logits[rows, cols] = float("-inf")
        return logits

    def _sample(self, logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        device = logits.device
        params = [r.sampling_params for r in requests]
        temps = torch.tensor([p.temperature for p in params], device=device)[:, None]
        logits = logits / temps
        if any(p.top_k > 0 for p in params):
            vocab = logits.shape[1]
            ks = torch.tensor([p.top_k if 0 < p.top_k < vocab else vocab for p in params], device=device)
            sorted_desc = logits.topk(int(ks.max()), dim=-1).values
            kth = sorted_desc.gather(1, (ks - 1)[:, None])
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if any(p.top_p < 1.0 for p in params):
            top_p = torch.tensor([p.top_p for p in params], device=device)[:, None]
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            sorted_probs = sorted_logits.softmax(dim=-1)
            # Keep the smallest set whose mass reaches top_p: drop a token if the mass before it already does.
            mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
            drop_sorted = mass_before >= top_p
            drop_sorted[:, 0] = False
            drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
            logits = logits.masked_fill(drop, float("-inf"))
        probs = logits.softmax(dim=-1)
        if any(p.min_p > 0.0 for p in params):
            min_p = torch.tensor([p.min_p for p in params], device=device)[:, None]
            threshold = probs.max(dim=-1, keepdim=True).values * min_p
            probs = probs.masked_fill(probs < threshold, 0.0)
        q = torch.empty_like(probs)
        unseeded = [i for i, r in enumerate(requests) if r.generator is None]
        if unseeded:
            q[unseeded] = torch.empty(len(unseeded), probs.shape[1]).exponential_(generator=self.generator).to(device)
        for i, r in enumerate(requests):
            if r.generator is not None:
                q[i] = torch.empty(probs.shape[1]).exponential_(generator=r.generator).to(device)
        return (probs / q).argmax(dim=-1)
