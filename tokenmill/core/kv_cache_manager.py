"""Maps requests to KV cache blocks; the scheduler sees only token counts, never block internals."""

from __future__ import annotations

from collections.abc import Sequence

from tokenmill.core.block_pool import BlockPool, KVBlock, hash_block
from tokenmill.request import Request


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True) -> None:
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.pool = BlockPool(num_blocks, enable_caching)
        # request_id -> the ids of the blocks holding that request's KV, in token order (the pool's `blocks`
        # list maps an id to its block). Building a batch reads these lists as they are.
        self.req_to_blocks: dict[str, list[int]] = {}
        # request_id -> how many of its leading blocks were already offered to the prefix cache.
        self._num_cached_blocks: dict[str, int] = {}
        # Prefix cache counters in tokens (as vLLM's prefix_cache_queries / prefix_cache_hits), counted once per
        # admission (record_admission), not per lookup: a request waiting for blocks looks up every step.
        self.num_queried_tokens = 0
        self.num_hit_tokens = 0

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def usage(self) -> float:
        return self.pool.usage

    def _extend_block_hashes(self, request: Request) -> None:
        hashes = request.block_hashes
        tokens = request.all_token_ids
        bs = self.block_size
        while (len(hashes) + 1) * bs <= len(tokens):
            start = len(hashes) * bs
            hashes.append(hash_block(hashes[-1] if hashes else None, tokens[start : start + bs]))

    def _uses_prefix_cache(self, request: Request) -> bool:
        # Prompt logprobs and mean pooling need every prompt position computed.
        return self.enable_caching and not request.needs_every_prompt_position

    def get_computed_blocks(self, request: Request) -> tuple[list[KVBlock], int]:
        """Longest cached prefix of the request's tokens, leaving at least one token to compute. A lookup
        only: the counters move when the request is admitted (record_admission)."""
        if not self._uses_prefix_cache(request):
            return [], 0
        self._extend_block_hashes(request)
        bs = self.block_size
        max_blocks = (request.num_tokens - 1) // bs
        blocks: list[KVBlock] = []
        for i, block_hash in enumerate(request.block_hashes[:max_blocks]):
            block = self.pool.get_cached_block(block_hash, request.all_token_ids[i * bs : (i + 1) * bs])
            if block is None:
                break
            blocks.append(block)
        return blocks, len(blocks) * bs

    def record_admission(self, request: Request, num_cached_tokens: int) -> None:
        """Count a prefix-cache query for a request admitted with num_cached_tokens from the cache."""
        if self._uses_prefix_cache(request):
            self.num_queried_tokens += request.num_tokens
            self.num_hit_tokens += num_cached_tokens

    def allocate_slots(
        self, request: Request, num_new_tokens: int, computed_blocks: Sequence[KVBlock] = ()
    ) -> bool:
        """Give the request room for num_new_tokens more tokens; False (and no change) if they do not fit.

        computed_blocks are prefix-cache hits for a request that holds no blocks yet; the caller adds
        len(computed_blocks) * block_size to request.num_computed_tokens. A decode whose last block has room
        and fills no block only passes the two checks below.
        """
        request_id = request.request_id
        block_ids = self.req_to_blocks.get(request_id)
        num_held = len(block_ids) if block_ids is not None else 0
        end = request.num_computed_tokens + len(computed_blocks) * self.block_size + num_new_tokens
        needed = cdiv(end, self.block_size) - num_held - len(computed_blocks)
        if needed > 0 or computed_blocks:
            # Cache hits sitting in the free queue stop being free once touched.
            reclaimed = sum(1 for b in computed_blocks if b.ref_cnt == 0)
            if needed > self.pool.num_free_blocks - reclaimed:
                return False
            if block_ids is None:
                block_ids = self.req_to_blocks[request_id] = []
            if computed_blocks:
                self.pool.touch(computed_blocks)
                block_ids.extend(b.block_id for b in computed_blocks)
            if needed > 0:
                block_ids.extend(b.block_id for b in self.pool.allocate(needed))
        elif block_ids is None:
            self.req_to_blocks[request_id] = []
        if self.enable_caching:
            # Register blocks that will be full once this step runs. Another request in the same step may hit
            # them: the runner writes every token's KV before any attention reads it, so that is safe.
            self._cache_full_blocks(request, end)
        return True

    def _cache_full_blocks(self, request: Request, num_tokens: int) -> None:
        bs = self.block_size
        num_full = min(num_tokens, request.num_tokens) // bs
        start = self._num_cached_blocks.get(request.request_id, 0)
        if num_full <= start:
            return
        self._extend_block_hashes(request)
        blocks = self.pool.blocks
        for i, block_id in enumerate(self.req_to_blocks[request.request_id][start:num_full], start):
            if blocks[block_id].block_hash is None:
                self.pool.cache_block(blocks[block_id], request.block_hashes[i],
                                      request.all_token_ids[i * bs : (i + 1) * bs])
        self._num_cached_blocks[request.request_id] = num_full

    def free(self, request: Request) -> None:
        block_ids = self.req_to_blocks.pop(request.request_id, None)
        self._num_cached_blocks.pop(request.request_id, None)
        if block_ids:
            # Tail blocks first: a shared prefix outlives the request-specific suffix in the eviction order.
            blocks = self.pool.blocks
            self.pool.free(blocks[i] for i in reversed(block_ids))

    def block_ids(self, request_id: str) -> list[int]:
        """The request's block ids in token order: the manager's own list, to read and not to change."""
        return self.req_to_blocks[request_id]

    def reset_prefix_cache(self) -> bool:
        return self.pool.reset_prefix_cache()

    def check_integrity(self) -> None:
        blocks = self.pool.blocks
        self.pool.check_integrity([blocks[i] for i in ids] for ids in self.req_to_blocks.values())
