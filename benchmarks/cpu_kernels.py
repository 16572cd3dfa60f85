"""The native CPU kernels against the PyTorch code they replace, side by side in one run.

    python benchmarks/cpu_kernels.py                 # SmolLM2-135M shapes, 2 torch threads by default
    python benchmarks/cpu_kernels.py --json kernels.json

For each kernel, the same inputs go through the native version (tokenmill/kernels/cpu/csrc) and through the
PyTorch code the model runs without it (tokenmill/model/llama.py, TorchAttentionBackend), alternating, and the
best of --repeat timings of each is compared:

- decode attention over a paged bf16 cache with random block tables (64 sequences and 1 long one), all layers;
- RMSNorm with the residual add, rotary embedding of q and k, SiLU-and-multiply and the KV-cache write, at a
  decode batch (64 tokens) and a prefill chunk (2,048 tokens), all layers;
- greedy argmax over a batch of 64 logit rows.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
import torch.nn.functional as F


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def compare(name: str, native, reference, repeat: int, rows: list) -> None:
    native(), reference()  # warm-up
    # Alternate the two so a busy spell of the machine hits both alike.
    native_s, reference_s = [], []
    for _ in range(repeat):
        native_s.append(timed(native))
        reference_s.append(timed(reference))
    row = {"kernel": name, "native_ms": 1000 * min(native_s), "pytorch_ms": 1000 * min(reference_s)}
    row["speedup"] = row["pytorch_ms"] / row["native_ms"]
    rows.append(row)
    print(f"{name:46s} native {row['native_ms']:8.2f} ms   PyTorch {row['pytorch_ms']:8.2f} ms   "
          f"{row['speedup']:5.1f}x", flush=True)


def main(argv: list[str] | None = None) -> int:
    from tokenmill.attention.backend import AttentionMetadata
    from tokenmill.attention.torch_backend import TorchAttentionBackend
    from tokenmill.engine.engine_core import allocate_zeroed
    from tokenmill.kernels.cpu import ops as cpu_kernels
    from tokenmill.model.llama import RMSNorm, _rotate

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--heads", type=int, default=9)
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--intermediate", type=int, default=1536)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--context", type=int, default=270, help="tokens per sequence in the 64-way decode")
    parser.add_argument("--long-context", type=int, default=4000, help="tokens of the single-sequence decode")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", dest="json_path", default=None)
    args = parser.parse_args(argv)
    if not cpu_kernels.layer_ops_supported():
        print("the native kernels are not available here (no C compiler or no AVX512-BF16)", file=sys.stderr)
        return 1
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    bf16, cpu = torch.bfloat16, torch.device("cpu")
    heads, kv_heads, head_dim, layers = args.heads, args.kv_heads, args.head_dim, args.layers
    rows: list[dict] = []
    print(f"{torch.get_num_threads()} threads, {layers} layers, heads {heads}/{kv_heads}x{head_dim}, "
          f"hidden {args.hidden}, intermediate {args.intermediate}")

    # ---- decode attention ----------------------------------------------------------------------------------
    block_size = 16
    backend = TorchAttentionBackend(heads, kv_heads, head_dim, head_dim**-0.5)
    for num_seqs, context in ((64, args.context), (1, args.long_context)):
        blocks_per_seq = -(-context // block_size)
        num_blocks = num_seqs * blocks_per_seq + 1
        caches = [allocate_zeroed((2, num_blocks, block_size, kv_heads, head_dim), bf16, cpu) for _ in range(layers)]
        for cache in caches:
            cache.normal_()
        tables = (torch.randperm(num_blocks - 1)[: num_seqs * blocks_per_seq] + 1).view(num_seqs, -1).int()
        seq_lens = torch.full((num_seqs,), context, dtype=torch.int32)
        q = torch.randn(num_seqs, heads, head_dim).to(bf16)
        meta = AttentionMetadata.build(list(range(num_seqs + 1)), [context] * num_seqs, tables,
                                       torch.zeros(num_seqs, dtype=torch.long))
        out = torch.empty_like(q)

        def native(caches=caches, q=q, tables=tables, seq_lens=seq_lens):
            for cache in caches:
                cpu_kernels.paged_decode_attention(q, cache, tables, seq_lens, head_dim**-0.5, None)

        def reference(caches=caches, q=q, meta=meta, out=out):
            for cache in caches:
                backend._decode(q, cache, meta, out)

        compare(f"decode attention, {num_seqs} x {context} tokens", native, reference, args.repeat, rows)
        del caches

    # ---- layer ops -------------------------------------------------------------------------------------------
    norm = RMSNorm(args.hidden, 1e-5).to(bf16)
    max_pos = 4096
    freqs = torch.outer(torch.arange(max_pos).float(),
                        1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim)))
    cos, sin = freqs.cos(), freqs.sin()
    qkv_width = (heads + 2 * kv_heads) * head_dim
    for tokens in (64, 2048):
        x = torch.randn(tokens, args.hidden).to(bf16)
        residual = torch.randn(tokens, args.hidden).to(bf16)
        qkv = torch.randn(tokens, qkv_width).to(bf16)
        q = qkv[:, : heads * head_dim].view(tokens, heads, head_dim)
        k = qkv[:, heads * head_dim : (heads + kv_heads) * head_dim].view(tokens, kv_heads, head_dim)
        v = qkv[:, (heads + kv_heads) * head_dim :].view(tokens, kv_heads, head_dim)
        positions = torch.randint(0, max_pos, (tokens,))
        gate_up = torch.randn(tokens, 2 * args.intermediate).to(bf16)
        cache = torch.zeros(2, tokens // block_size + 1, block_size, kv_heads, head_dim, dtype=bf16)
        slots = torch.randperm(cache.shape[1] * block_size)[:tokens]

        def native_ops(x=x, residual=residual, q=q, k=k, v=v, positions=positions, gate_up=gate_up, cache=cache,
                       slots=slots):
            for _ in range(layers):
                cpu_kernels.rms_norm(x, norm.weight, norm.eps, residual=residual)
                cpu_kernels.rotary_embedding_(q, k, positions, cos, sin)
                cpu_kernels.write_kv(k, v, cache, slots)
                cpu_kernels.rms_norm(x, norm.weight, norm.eps, residual=residual)
                cpu_kernels.silu_and_mul(gate_up)

        def torch_ops(x=x, residual=residual, q=q, k=k, v=v, positions=positions, gate_up=gate_up, cache=cache,
                      slots=slots):
            step_cos, step_sin = cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)
            for _ in range(layers):
                norm._norm(x + residual)
                qk = _rotate(torch.cat((q, k), dim=1), step_cos, step_sin)
                backend.write_kv(qk[:, heads:], v, cache, slots)
                norm._norm(x + residual)
                gate, up = gate_up.chunk(2, dim=-1)
                F.silu(gate) * up

        compare(f"norms + rotary + KV write + SiLU, {tokens} tokens", native_ops, torch_ops, args.repeat, rows)

    logits = torch.randn(64, args.vocab).to(bf16)
    compare("greedy argmax, 64 rows (bf16 logits)", lambda: cpu_kernels.argmax(logits),
            lambda: logits.float().argmax(dim=-1), args.repeat, rows)

    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump({"benchmark": "cpu_kernels", "threads": torch.get_num_threads(), "args": vars(args),
                       "rows": rows}, f, indent=2)
        print(f"Results written to {args.json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
