"""Reference attention backend in plain PyTorch: runs on any device, used on CPU."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tokenmill.attention.backend import AttentionBackend, AttentionMetadata


class TorchAttentionBackend(AttentionBackend):
    name = "torch"

    def write_kv(self, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                 slot_mapping: torch.Tensor) -> None:
        num_slots = kv_cache.shape[1] * kv_cache.shape[2]
        # [num_blocks * block_size, num_kv_heads, head_dim] views of the key and value halves.
        kv_cache[0].view(num_slots, self.num_kv_heads, self.head_dim).index_copy_(0, slot_mapping, key)
        kv_cache[1].view(num_slots, self.num_kv_heads, self.head_dim).index_copy_(0, slot_mapping, value)

    def _gather(self, kv_cache: torch.Tensor, block_table: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of one sequence, [num_kv_heads, seq_len, head_dim] each."""
        block_size = kv_cache.shape[2]
        num_blocks = -(-seq_len // block_size)
        blocks = kv_cache[:, block_table[:num_blocks]]  # [2, n, block_size, kv_heads, head_dim]
        kv = blocks.reshape(2, num_blocks * block_size, self.num_kv_heads, self.head_dim)[:, :seq_len]
        return kv[0].transpose(0, 1), kv[1].transpose(0, 1)

    def _mask(self, query_len: int, seq_len: int, device: torch.device) -> torch.Tensor:
        """[query_len, seq_len] bool, True where query i (position seq_len - query_len + i) may attend key j."""
        q_pos = torch.arange(seq_len - query_len, seq_len, device=device)[:, None]
        k_pos = torch.arange(seq_len, device=device)[None, :]
        allowed = k_pos <= q_pos
        if self.sliding_window is not None:
            allowed &= k_pos > q_pos - self.sliding_window
        return allowed

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
               meta: AttentionMetadata) -> torch.Tensor:
        out = torch.empty_like(query)
        starts = meta.query_start_loc_list
        for i in meta.prefill_indices:
            start, end = starts[i], starts[i + 1]
            query_len, seq_len = end - start, meta.seq_lens_list[i]
            # 4-D [1, heads, tokens, head_dim]: SDPA's fused CPU kernel takes only batched inputs.
            q = query[start:end].transpose(0, 1)[None]
            if query_len == seq_len and self.sliding_window is None:
                # No cached context: attend over this step's keys directly.
                k, v = key[start:end].transpose(0, 1)[None], value[start:end].transpose(0, 1)[None]
                o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale, enable_gqa=True)
            else:
                k, v = self._gather(kv_cache, meta.block_tables[i], seq_len)
                mask = self._mask(query_len, seq_len, query.device)
                o = F.scaled_dot_product_attention(q, k[None], v[None], attn_mask=mask, scale=self.scale,
                                                   enable_gqa=True)
            out[start:end] = o[0].transpose(0, 1)
        if meta.decode_indices:
            self._decode(query, kv_cache, meta, out)
        return out

    def _decode_groups(self, meta: AttentionMetadata) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]]:
        """Decodes sorted by length and cut into groups, so padding to a group's longest stays small.

        Each group: (query rows, sequence lengths, block tables, longest length). Computed once per step.
        """
        groups = meta.backend_cache.get("torch_decode_groups")
        if groups is not None:
            return groups
        lens = meta.seq_lens_list
        order = sorted(range(len(meta.decode_indices)), key=lambda j: lens[meta.decode_indices[j]])
        cuts, start = [], 0
        for end in range(1, len(order) + 1):
            # Close a group when padding the next sequence's length over it would waste more than a quarter.
            if end == len(order):
                cuts.append((start, end))
            else:
                longest = lens[meta.decode_indices[order[end]]]
                used = sum(lens[meta.decode_indices[j]] for j in order[start : end + 1])
                if (end + 1 - start) * longest > 1.25 * used + 64 * (end + 1 - start) and end - start >= 4:
                    cuts.append((start, end))
                    start = end
        groups = []
        rows, seq_lens, tables = meta.decode_rows, meta.decode_seq_lens, meta.decode_block_tables
        assert rows is not None and seq_lens is not None and tables is not None  # set whenever decodes exist
        for a, b in cuts:
            members = torch.tensor(order[a:b], device=rows.device)
            longest = lens[meta.decode_indices[order[b - 1]]]
            groups.append((rows[members], seq_lens[members], tables[members], longest))
        meta.backend_cache["torch_decode_groups"] = groups
        return groups

    def _decode(self, query: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
                out: torch.Tensor) -> None:
        """Single-token sequences in a few batches of similar length, each padded to its longest."""
        block_size = kv_cache.shape[2]
        for rows, seq_lens, tables, max_len in self._decode_groups(meta):
            num_blocks = -(-max_len // block_size)
            kv = kv_cache[:, tables[:, :num_blocks]]  # [2, group, num_blocks, block_size, kv_heads, head_dim]
            group = rows.shape[0]
            kv = kv.reshape(2, group, num_blocks * block_size, self.num_kv_heads, self.head_dim)
            k = kv[0].transpose(1, 2)  # [group, kv_heads, padded_len, head_dim]
            v = kv[1].transpose(1, 2)
            positions = torch.arange(num_blocks * block_size, device=query.device)[None, :]
            allowed = positions < seq_lens[:, None]
            if self.sliding_window is not None:
                allowed &= positions >= (seq_lens[:, None] - self.sliding_window)
            q = query[rows].unsqueeze(2)  # [group, num_heads, 1, head_dim]
            o = F.scaled_dot_product_attention(
                q, k, v, attn_mask=allowed[:, None, None, :], scale=self.scale, enable_gqa=True
            )
            out[rows] = o.squeeze(2)
