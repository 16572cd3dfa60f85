"""Pool of fixed-size KV cache blocks with reference counts and a prefix cache.

A block is either in use (ref_cnt > 0) or free. Free blocks wait in a queue ordered by eviction priority
(least recently used first). A free block may still hold a cached prefix (block_hash set): a later request
with the same prefix takes it back out of the queue (`touch`) instead of recomputing it. A free block is
only evicted from the cache when it is handed out again.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

_ROOT_HASH = b"tokenmill-prefix-root"


def hash_block(parent_hash: bytes | None, token_ids: Sequence[int]) -> bytes:
    """SHA-256 over the parent block's hash and this block's token ids: one hash names a whole prefix."""
    h = hashlib.sha256(parent_hash or _ROOT_HASH)
    h.update(b"".join(t.to_bytes(4, "little", signed=False) for t in token_ids))
    return h.digest()


@dataclass(eq=False, slots=True)
class KVBlock:
    block_id: int
    ref_cnt: int = 0
    # Hash of the prefix ending with this block, once the block is full and cached.
    block_hash: bytes | None = None
    # The block's own tokens, checked on every cache hit so that a hash collision can never serve wrong KV.
    token_ids: tuple[int, ...] | None = None


class BlockPool:
    def __init__(self, num_blocks: int, enable_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError(f"the KV cache needs at least one block, got num_blocks={num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        # block_id -> block, in eviction order (front is evicted first).
        self._free: OrderedDict[int, KVBlock] = OrderedDict((b.block_id, b) for b in self.blocks)
        # prefix hash -> cached block.
        self._cached: dict[bytes, KVBlock] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        return 1.0 - len(self._free) / self.num_blocks

    def get_cached_block(self, block_hash: bytes, token_ids: Sequence[int]) -> KVBlock | None:
        block = self._cached.get(block_hash)
        if block is None or block.token_ids != tuple(token_ids):
            return None
        return block

    def allocate(self, num_blocks: int) -> list[KVBlock]:
        """Take num_blocks free blocks (evicting their cached prefixes); the caller checked there are enough."""
        if num_blocks > len(self._free):
            raise RuntimeError(f"asked for {num_blocks} blocks with only {len(self._free)} free")
        out = []
        for _ in range(num_blocks):
            _, block = self._free.popitem(last=False)
            if block.block_hash is not None:
                del self._cached[block.block_hash]
                block.block_hash = None
                block.token_ids = None
            block.ref_cnt = 1
            out.append(block)
        return out

    def touch(self, blocks: Iterable[KVBlock]) -> None:
        """Take a reference on blocks found in the prefix cache."""
        for block in blocks:
            if block.ref_cnt == 0:
                del self._free[block.block_id]
            block.ref_cnt += 1

    def free(self, blocks: Iterable[KVBlock]) -> None:
        """Drop one reference each; blocks reaching zero join the back of the eviction queue in this order."""
        for block in blocks:
            if block.ref_cnt <= 0:
                raise RuntimeError(f"block {block.block_id} freed with ref_cnt={block.ref_cnt}")
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                if block.block_hash is None or not self.enable_caching:
                    # Uncached blocks carry nothing worth keeping: hand them out first.
                    self._free[block.block_id] = block
                    self._free.move_to_end(block.block_id, last=False)
                else:
                    self._free[block.block_id] = block

    def cache_block(self, block: KVBlock, block_hash: bytes, token_ids: Sequence[int]) -> None:
        """Register a full block under its prefix hash; a prefix already cached keeps its first block."""
        if not self.enable_caching or block.block_hash is not None or block_hash in self._cached:
            return
        block.block_hash = block_hash
        block.token_ids = tuple(token_ids)
        self._cached[block_hash] = block

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix; only possible when no block is in use."""
        if len(self._free) != self.num_blocks:
            return False
        for block in self.blocks:
            block.block_hash = None
            block.token_ids = None
        self._cached.clear()
        return True

    def check_integrity(self, holders: Iterable[Sequence[KVBlock]] = ()) -> None:
        """Raise AssertionError if the pool's bookkeeping is inconsistent.

        holders: the block lists of every request holding blocks; each block's ref_cnt must equal the number of
        times it appears there.
        """
        counts = [0] * self.num_blocks
        for blocks in holders:
            for block in blocks:
                counts[block.block_id] += 1
        used = 0
        for block in self.blocks:
            if block.ref_cnt != counts[block.block_id]:
                raise AssertionError(
                    f"block {block.block_id}: ref_cnt={block.ref_cnt} but held {counts[block.block_id]} times"
                )
            in_free = block.block_id in self._free
            if (block.ref_cnt == 0) != in_free:
                raise AssertionError(f"block {block.block_id}: ref_cnt={block.ref_cnt} but in_free={in_free}")
            used += block.ref_cnt > 0
        if used + len(self._free) != self.num_blocks:
            raise AssertionError(f"free {len(self._free)} + used {used} != total {self.num_blocks}")
        for block_hash, block in self._cached.items():
            if block.block_hash != block_hash:
                raise AssertionError(f"cache entry points at block {block.block_id} with another hash")
