"""xgrammar against llguidance for structured outputs, side by side in one run on this machine.

    python benchmarks/structured_output_backends.py                  # bundled SmolLM2 tokenizer + tiny tokenizer
    python benchmarks/structured_output_backends.py --json so.json

For each tokenizer (the bundled SmolLM2-135M-Instruct one, 49,152 tokens, read from its GGUF; and the tiny
384-token BPE tokenizer the tests use) and each backend, through tokenmill.structured_output:

- setup: building the backend's tokenizer tables plus its first compile (paid once per engine);
- compile: three JSON schemas, cold (the backend compiles) and cached (the manager's cache answers);
- fill / accept: per-token time to fill one sequence's bitmask row and to accept a token, walking a valid
  instance of each schema token by token;
- apply: setting the forbidden logits of a [batch, vocab] float32 / bfloat16 tensor to -inf, every row
  constrained: tokenmill's fused torch.compile'd kernel (also with only every other row constrained),
  xgrammar's native CPU kernel, llguidance's own torch.compile'd kernel, and the plain torch
  shift-and-masked_fill, alternated, best of --repeat.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tokenmill.model.tokenizer import Tokenizer  # noqa: E402
from tokenmill.structured_output import (  # noqa: E402
    StructuredOutputManager,
    StructuredOutputsParams,
    allocate_token_bitmask,
    apply_token_bitmask_,
)
from tokenmill.structured_output.bitmask import apply_token_bitmask_torch_, warmup_apply_kernel  # noqa: E402

SCHEMAS = {
    "person": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 24},
            "age": {"type": "integer", "minimum": 0, "maximum": 150},
            "member": {"type": "boolean"},
            "role": {"enum": ["admin", "user", "guest"]},
            "address": {"type": "object",
                        "properties": {"city": {"type": "string"}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                        "required": ["city", "zip"]},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 10}, "maxItems": 5},
        },
        "required": ["name", "age", "member", "role", "address", "tags"],
    },
    "inventory": {
        "type": "object",
        "properties": {
            "kind": {"const": "inventory"},
            "items": {"type": "array", "maxItems": 8, "items": {
                "type": "object",
                "properties": {"sku": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{3}$"},
                               "count": {"type": "integer", "minimum": 0}, "price": {"type": "number"},
                               "fragile": {"type": "boolean"}},
                "required": ["sku", "count", "price"]}},
            "note": {"type": ["string", "null"]},
        },
        "required": ["kind", "items", "note"],
    },
    "order": {
        "$defs": {"Money": {"type": "object",
                            "properties": {"amount": {"type": "number"}, "currency": {"enum": ["EUR", "USD"]}},
                            "required": ["amount", "currency"]}},
        "type": "object",
        "properties": {
            "id": {"type": "integer"},
            "total": {"$ref": "#/$defs/Money"},
            "lines": {"type": "array", "items": {"type": "object", "properties": {
                "product": {"type": "string"}, "price": {"$ref": "#/$defs/Money"}},
                "required": ["product", "price"]}},
            "status": {"anyOf": [{"enum": ["open", "closed"]}, {"type": "boolean"}]},
        },
        "required": ["id", "total", "lines", "status"],
    },
}
INSTANCES = {
    "person": {"name": "Ada Lovelace", "age": 36, "member": True, "role": "admin",
               "address": {"city": "London", "zip": "12345"}, "tags": ["math", "engines"]},
    "inventory": {"kind": "inventory", "items": [{"sku": "AB123", "count": 4, "price": 9.5, "fragile": False},
                                                 {"sku": "XY999", "count": 0, "price": 120.0}], "note": None},
    "order": {"id": 7, "total": {"amount": 19.99, "currency": "EUR"},
              "lines": [{"product": "tea", "price": {"amount": 4.5, "currency": "EUR"}}], "status": "open"},
}


def bundled_tokenizer() -> Tokenizer:
    from tokenmill.model.default_model import prepare_model

    return Tokenizer.from_pretrained(prepare_model(None))


def tiny_tokenizer() -> Tokenizer:
    from tests.tiny_models import build_tokenizer

    path = Path(tempfile.mkdtemp(prefix="tokenmill-bench-tok-"))
    build_tokenizer(path)
    return Tokenizer.from_pretrained(path)


def measure_backend(tokenizer: Tokenizer, backend: str) -> dict:
    manager = StructuredOutputManager(tokenizer, backend=backend, compile_timeout_s=600)
    row: dict = {"backend": backend}
    start = time.perf_counter()
    manager.compile(StructuredOutputsParams(regex="[a-z]+"))
    row["setup_s"] = time.perf_counter() - start
    validate, cold, cached, fill, accept = [], [], [], [], []
    for name, schema in SCHEMAS.items():
        params = StructuredOutputsParams(json=schema, disable_any_whitespace=True)
        start = time.perf_counter()
        compiled = manager.compile(params)
        cold.append(time.perf_counter() - start)
        # A second request with the same schema as JSON text: validating its params (parse, metaschema check)
        # happens where the request arrives; the cache hit is what the engine pays.
        start = time.perf_counter()
        same = StructuredOutputsParams(json=json.dumps(schema), disable_any_whitespace=True)
        validate.append(time.perf_counter() - start)
        start = time.perf_counter()
        again = manager.compile(same)
        cached.append(time.perf_counter() - start)
        assert again is compiled
        token_ids = tokenizer.encode(json.dumps(INSTANCES[name], separators=(",", ":")), add_special_tokens=False)
        bitmask = allocate_token_bitmask(1, manager.vocab_size)
        matcher = compiled.matcher()
        for token_id in [*token_ids, next(iter(matcher.stop_token_ids))]:
            start = time.perf_counter()
            matcher.fill_bitmask(bitmask, 0)
            fill.append(time.perf_counter() - start)
            start = time.perf_counter()
            ok = matcher.accept_token(token_id)
            accept.append(time.perf_counter() - start)
            assert ok, f"{backend} refused token {token_id} of the {name} instance"
        assert matcher.is_terminated()
    manager.shutdown()
    row["validate_ms"] = [1000 * s for s in validate]
    row["compile_cold_ms"] = [1000 * s for s in cold]
    row["compile_cached_ms"] = [1000 * s for s in cached]
    row["fill_us"] = 1e6 * statistics.mean(fill)
    row["fill_p99_us"] = 1e6 * sorted(fill)[int(0.99 * (len(fill) - 1))]
    row["accept_us"] = 1e6 * statistics.mean(accept)
    row["num_tokens"] = len(fill)
    return row


def measure_apply(vocab_size: int, batch: int, dtype: torch.dtype, repeat: int, llguidance_kernel: bool) -> dict:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(batch, vocab_size, generator=g).to(dtype)
    bitmask = torch.randint(-(2**31), 2**31 - 1, (batch, (vocab_size + 31) // 32), generator=g,
                            dtype=torch.int64).to(torch.int32)
    rows = list(range(batch))
    work = logits.clone()
    from xgrammar.kernels.apply_token_bitmask_inplace_cpu import apply_token_bitmask_inplace_cpu

    kernels = {
        "xgrammar": lambda: apply_token_bitmask_inplace_cpu(work, bitmask, vocab_size, rows),
        "torch": lambda: apply_token_bitmask_torch_(work, bitmask, rows),
    }
    row: dict = {"batch": batch, "dtype": str(dtype).replace("torch.", "")}
    if warmup_apply_kernel(vocab_size, dtype):
        kernels["fused"] = lambda: apply_token_bitmask_(work, bitmask, rows)
        half = rows[::2]  # every other row constrained: the others must come out untouched
        kernels["fused_half_rows"] = lambda: apply_token_bitmask_(work, bitmask, half)
    try:
        if not llguidance_kernel:
            raise RuntimeError("not measured (--no-llguidance-kernel)")
        from llguidance.torch import apply_token_bitmask_inplace

        apply_token_bitmask_inplace(work, bitmask)  # compiles (torch.compile) for this shape
        kernels["llguidance"] = lambda: apply_token_bitmask_inplace(work, bitmask)
    except Exception as e:  # torch.compile needs a working C++ toolchain for CPU code
        row["llguidance_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
    times: dict[str, list[float]] = {name: [] for name in kernels}
    for fn in kernels.values():
        fn()  # warm-up
    # Alternated, so that a busy spell of the shared machine hits all of them alike; best of each.
    for _ in range(repeat):
        for name, fn in kernels.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    for name in ("fused", "fused_half_rows", "xgrammar", "llguidance", "torch"):
        row[f"{name}_ms"] = 1000 * min(times[name]) if name in times else None
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--batches", default="1,32,64")
    parser.add_argument("--tokenizers", default="bundled,tiny", help="bundled and/or tiny")
    parser.add_argument("--no-llguidance-kernel", action="store_true",
                        help="skip llguidance's apply kernel (its torch.compile takes a while the first time)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    results: dict = {"torch_threads": args.threads, "tokenizers": {}}
    loaders = {"bundled": ("bundled SmolLM2 (49,152 tokens)", bundled_tokenizer),
               "tiny": ("tiny BPE (384 tokens)", tiny_tokenizer)}
    for key in args.tokenizers.split(","):
        label, load = loaders[key]
        tokenizer = load()
        rows = [measure_backend(tokenizer, backend) for backend in ("xgrammar", "guidance")]
        apply_rows = [
            measure_apply(tokenizer.vocab_size, int(batch), dtype, args.repeat, not args.no_llguidance_kernel)
            for dtype in (torch.float32, torch.bfloat16) for batch in args.batches.split(",")
        ]
        results["tokenizers"][label] = {"vocab_size": tokenizer.vocab_size, "backends": rows, "apply": apply_rows}

        print(f"\n## {label}")
        print("| backend | setup (tables + 1st compile) | compile cold: " + " / ".join(SCHEMAS)
              + " | cache hit | params validation | fill / token | fill p99 | accept / token |")
        print("|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['backend']} | {1000 * r['setup_s']:.0f} ms | "
                  + " / ".join(f"{ms:.1f}" for ms in r["compile_cold_ms"]) + " ms | "
                  + " / ".join(f"{ms:.3f}" for ms in r["compile_cached_ms"]) + " ms | "
                  + " / ".join(f"{ms:.2f}" for ms in r["validate_ms"]) + " ms | "
                  f"{r['fill_us']:.1f} us | {r['fill_p99_us']:.1f} us | {r['accept_us']:.1f} us |")
        print("\n| batch | dtype | tokenmill fused (torch.compile) | same, half the rows | xgrammar native | "
              "llguidance (torch.compile) | plain torch | xgrammar / fused | torch / fused |")
        print("|---|---|---|---|---|---|---|---|---|")

        def ms(value: float | None) -> str:
            return f"{value:.3f} ms" if value is not None else "n/a"

        for r in apply_rows:
            fused = r["fused_ms"]
            ratios = (f"{r['xgrammar_ms'] / fused:.1f}x | {r['torch_ms'] / fused:.1f}x" if fused else "n/a | n/a")
            print(f"| {r['batch']} | {r['dtype']} | {ms(fused)} | {ms(r['fused_half_rows_ms'])} | "
                  f"{ms(r['xgrammar_ms'])} | {ms(r['llguidance_ms'])} | {ms(r['torch_ms'])} | {ratios} |")
            if r.get("llguidance_error"):
                print(f"|   | llguidance kernel unavailable: {r['llguidance_error']} | | | | | | | |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
