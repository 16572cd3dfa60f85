"""Benchmark requests: random, prefix-repetition and ShareGPT-format datasets, all seeded.

Every request's prompt text is what a server is sent; prompt_token_ids are that text encoded with the model's
tokenizer (special tokens included, as a server would), and the offline benchmark feeds those ids to the
engine, so both benchmarks see the same prompts. Random text is made of random vocabulary tokens, re-encoded
until it has the asked-for number of tokens (a decode/encode round trip can merge or split tokens).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

logger = logging.getLogger("tokenmill.bench")

DATASET_NAMES = ("random", "prefix-repetition", "sharegpt")


class TokenizerLike(Protocol):
    @property
    def vocab_size(self) -> int: ...

    @property
    def all_special_ids(self) -> list[int]: ...

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...


@dataclass
class SampleRequest:
    prompt: str
    prompt_token_ids: list[int]
    # Output tokens to generate (sent as max_tokens with ignore_eos).
    expected_output_len: int

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)


def _check_range(name: str, value: tuple[int, int]) -> tuple[int, int]:
    lo, hi = value
    if lo < 1 or hi < lo:
        raise ValueError(f"{name} range {lo}-{hi} is invalid: give MIN-MAX with 1 <= MIN <= MAX")
    return lo, hi


def parse_range(text: str) -> tuple[int, int]:
    """'128' -> (128, 128); '32-512' -> (32, 512)."""
    parts = text.split("-")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise ValueError(f"{text!r} is not a length or a MIN-MAX range such as 32-512") from None
    if len(values) == 1:
        return values[0], values[0]
    if len(values) == 2:
        return values[0], values[1]
    raise ValueError(f"{text!r} is not a length or a MIN-MAX range such as 32-512")


def _vocab_ids(tokenizer: TokenizerLike) -> np.ndarray:
    special = set(tokenizer.all_special_ids)
    return np.array([i for i in range(tokenizer.vocab_size) if i not in special], dtype=np.int64)


def random_text(
    tokenizer: TokenizerLike, rng: np.random.Generator, vocab_ids: np.ndarray, num_tokens: int
) -> str:
    """Text of random vocabulary tokens that encodes (without special tokens) to about num_tokens tokens."""
    text = tokenizer.decode(rng.choice(vocab_ids, size=num_tokens).tolist())
    # A few rounds of trimming or extending: the round trip can merge neighbours or split a partial character.
    for _ in range(4):
        encoded = tokenizer.encode(text, add_special_tokens=False)
        if len(encoded) == num_tokens:
            break
        if len(encoded) > num_tokens:
            text = tokenizer.decode(encoded[:num_tokens])
        else:
            text += tokenizer.decode(rng.choice(vocab_ids, size=num_tokens - len(encoded)).tolist())
    return text


def random_requests(
    tokenizer: TokenizerLike,
    num_requests: int,
    input_len: tuple[int, int] = (128, 128),
    output_len: tuple[int, int] = (128, 128),
    seed: int = 0,
) -> list[SampleRequest]:
    """Random-token prompts, lengths drawn uniformly from input_len, output lengths from output_len."""
    in_lo, in_hi = _check_range("input length", input_len)
    out_lo, out_hi = _check_range("output length", output_len)
    rng = np.random.default_rng(seed)
    vocab_ids = _vocab_ids(tokenizer)
    input_lens = rng.integers(in_lo, in_hi + 1, size=num_requests)
    output_lens = rng.integers(out_lo, out_hi + 1, size=num_requests)
    requests = []
    for n_in, n_out in zip(input_lens.tolist(), output_lens.tolist(), strict=True):
        text = random_text(tokenizer, rng, vocab_ids, n_in)
        requests.append(SampleRequest(text, tokenizer.encode(text), n_out))
    return requests


def prefix_repetition_requests(
    tokenizer: TokenizerLike,
    num_requests: int,
    prefix_len: int = 512,
    suffix_len: int = 32,
    num_prefixes: int = 4,
    output_len: int = 64,
    seed: int = 0,
) -> list[SampleRequest]:
    """Many prompts sharing a few long prefixes: request i gets prefix i mod num_prefixes and its own suffix,
    in a seeded shuffled order, so a prefix cache can serve all but the first request of each prefix."""
    if min(prefix_len, suffix_len, num_prefixes, output_len) < 1:
        raise ValueError("prefix-repetition needs prefix_len, suffix_len, num_prefixes and output_len >= 1")
    rng = np.random.default_rng(seed)
    vocab_ids = _vocab_ids(tokenizer)
    prefixes = [random_text(tokenizer, rng, vocab_ids, prefix_len) for _ in range(num_prefixes)]
    requests = []
    for i in range(num_requests):
        text = prefixes[i % num_prefixes] + random_text(tokenizer, rng, vocab_ids, suffix_len)
        requests.append(SampleRequest(text, tokenizer.encode(text), output_len))
    order = rng.permutation(num_requests).tolist()
    return [requests[i] for i in order]


def sharegpt_requests(
    tokenizer: TokenizerLike,
    path: str | Path,
    num_requests: int,
    output_len: int | None = None,
    seed: int = 0,
    max_prompt_len: int = 1024,
    max_total_len: int = 2048,
) -> list[SampleRequest]:
    """First human turn as the prompt, the first reply's token count as the output length (or output_len).

    The file is a JSON list of {"conversations": [{"from": "human", "value": ...}, {"from": "gpt", ...}]}
    (ShareGPT_V3_unfiltered_cleaned_split.json and its copies). As in vLLM, conversations are shuffled with
    the seed, and pairs with fewer than 4 prompt or output tokens, a prompt over max_prompt_len or a total
    over max_total_len are skipped.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"ShareGPT file {path} not found: pass the path of a ShareGPT-format JSON file"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(
            f"{path} is not valid JSON ({e}): a ShareGPT file is a JSON list of conversations"
        ) from e
    if not isinstance(data, list):
        raise ValueError(
            f"{path} holds a JSON {type(data).__name__}: a ShareGPT file is a list of conversations"
        )
    rng = np.random.default_rng(seed)
    requests = []
    for index in rng.permutation(len(data)).tolist():
        entry = data[index]
        if not isinstance(entry, dict):
            continue
        turns = entry.get("conversations") or entry.get("conversation")
        if not isinstance(turns, list) or len(turns) < 2:
            continue
        if not all(isinstance(turn, dict) for turn in turns[:2]):
            continue
        prompt, reply = turns[0].get("value"), turns[1].get("value")
        if not isinstance(prompt, str) or not isinstance(reply, str):
            continue
        prompt_ids = tokenizer.encode(prompt)
        n_out = (
            output_len if output_len is not None else len(tokenizer.encode(reply, add_special_tokens=False))
        )
        if len(prompt_ids) < 4 or n_out < 4 or len(prompt_ids) > max_prompt_len:
            continue
        if len(prompt_ids) + n_out > max_total_len:
            continue
        requests.append(SampleRequest(prompt, prompt_ids, n_out))
        if len(requests) == num_requests:
            break
    if not requests:
        raise ValueError(
            f"{path} has no usable conversation (two turns, 4+ tokens each, within length limits)"
        )
    if len(requests) < num_requests:
        logger.warning(
            "%s gave %d usable conversations of the %d requests asked for", path, len(requests), num_requests
        )
    return requests
