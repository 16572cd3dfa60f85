"""Per-token cost of incremental detokenization, side by side in one run.

Compares, on the same token stream of the bundled SmolLM2 tokenizer (or --model):
- tokenmill's IncrementalDetokenizer (text == decode(ids), invalid bytes shown at once);
- the previous algorithm (two decodes per token over a window with prompt context, holding any text that ends
  in U+FFFD), kept here only as the baseline;
- tokenizers' DecodeStream (Rust; the same holding rule as the previous algorithm, so not exact).

    python benchmarks/detokenizer.py [--model PATH] [--tokens 512] [--requests 40]
"""

from __future__ import annotations

import argparse
import random
import time

from tokenizers.decoders import DecodeStream

from tokenmill.engine.detokenizer import IncrementalDetokenizer
from tokenmill.model.default_model import prepare_model
from tokenmill.model.tokenizer import Tokenizer
from tokenmill.sampling_params import SamplingParams

_TEXT = (
    "Paged attention stores keys and values in fixed-size blocks, so a request's cache grows block by block. "
    "Le café est très bon; Größe, naïve façade, 東京タワー, 世界 🙂. def main():\n    return 42\n"
)


class _Previous:
    """The previous algorithm, as it was (stop strings left out)."""

    def __init__(self, tok: Tokenizer, prompt: list[int]) -> None:
        self.tok = tok
        context = prompt[-6:]
        self.ids = list(context)
        self.prefix_offset, self.read_offset = 0, len(context)
        self.text = ""

    def add_token(self, token_id: int) -> None:
        self.ids.append(token_id)
        prefix = self.tok.decode(self.ids[self.prefix_offset : self.read_offset])
        full = self.tok.decode(self.ids[self.prefix_offset :])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return
        self.text += full[len(prefix) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)


def _previous(tok: Tokenizer, prompt: list[int], ids: list[int]) -> None:
    detok = _Previous(tok, prompt)
    for token_id in ids:
        detok.add_token(token_id)


def _current(tok: Tokenizer, prompt: list[int], ids: list[int]) -> None:
    detok = IncrementalDetokenizer(tok, prompt, SamplingParams())
    for token_id in ids:
        detok.add_token(token_id)
    detok.visible_text(finished=True)


def _decode_stream(tok: Tokenizer, prompt: list[int], ids: list[int]) -> None:
    stream = DecodeStream(skip_special_tokens=True)
    for token_id in ids:
        stream.step(tok.backend, token_id)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model directory or .gguf (default: bundled SmolLM2)")
    parser.add_argument("--tokens", type=int, default=512, help="tokens per request")
    parser.add_argument("--requests", type=int, default=40, help="requests per stream")
    parser.add_argument("--repeats", type=int, default=3, help="best of this many runs")
    args = parser.parse_args()
    tok = Tokenizer.from_pretrained(prepare_model(args.model))
    text_ids = tok.encode(_TEXT, add_special_tokens=False)
    streams = {
        "text": (text_ids * (args.tokens // len(text_ids) + 1))[: args.tokens],
        "random ids": [random.Random(0).randrange(tok.vocab_size) for _ in range(args.tokens)],
    }
    # The bundled tokenizer's 256 single-byte tokens in random order: partial and invalid UTF-8 throughout.
    byte_ids = [i for i in range(tok.vocab_size) if len(tok.token_bytes(i) or b"") == 1]
    streams["random bytes"] = [random.Random(1).choice(byte_ids) for _ in range(args.tokens)]
    prompt = tok.encode("Write a story:")
    runners = {"previous": _previous, "tokenmill": _current, "DecodeStream": _decode_stream}
    print(f"{args.requests} requests of {args.tokens} tokens per stream, best of {args.repeats}; us/token")
    for name, ids in streams.items():
        cost = {}
        for runner_name, runner in runners.items():
            best = float("inf")
            for _ in range(args.repeats):
                start = time.perf_counter()
                for _ in range(args.requests):
                    runner(tok, prompt, ids)
                best = min(best, time.perf_counter() - start)
            cost[runner_name] = best / (len(ids) * args.requests) * 1e6
        line = ", ".join(f"{k} {v:.2f}" for k, v in cost.items())
        print(f"{name:>10}: {line}; tokenmill/previous {cost['tokenmill'] / cost['previous']:.2f}x")


if __name__ == "__main__":
    main()
