"""datasets.py and load.py: seeded request sets and arrival times."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from tokenmill.benchmarks.datasets import (
    parse_range,
    prefix_repetition_requests,
    random_requests,
    sharegpt_requests,
)
from tokenmill.benchmarks.load import arrival_offsets, parse_concurrencies
from tokenmill.model.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer_dir):
    return Tokenizer.from_pretrained(tiny_tokenizer_dir)


def test_random_requests_are_seeded_and_within_ranges(tokenizer):
    a = random_requests(tokenizer, 12, input_len=(16, 48), output_len=(4, 9), seed=3)
    b = random_requests(tokenizer, 12, input_len=(16, 48), output_len=(4, 9), seed=3)
    c = random_requests(tokenizer, 12, input_len=(16, 48), output_len=(4, 9), seed=4)
    assert [(r.prompt, r.expected_output_len) for r in a] == [(r.prompt, r.expected_output_len) for r in b]
    assert [r.prompt for r in a] != [r.prompt for r in c]
    assert all(4 <= r.expected_output_len <= 9 for r in a)
    # The text round trip may move a length by a token or two; prompt_token_ids is what the text encodes to.
    assert all(14 <= r.prompt_len <= 50 for r in a)
    assert all(r.prompt_token_ids == tokenizer.encode(r.prompt) for r in a)
    special = set(tokenizer.all_special_ids)
    assert not any(special & set(r.prompt_token_ids) for r in a)


def test_random_requests_reject_bad_ranges(tokenizer):
    with pytest.raises(ValueError, match="1 <= MIN <= MAX"):
        random_requests(tokenizer, 2, input_len=(10, 5))


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def test_prefix_repetition_shares_a_few_prefixes(tokenizer):
    requests = prefix_repetition_requests(
        tokenizer, 12, prefix_len=64, suffix_len=8, num_prefixes=3, output_len=5, seed=1
    )
    assert len(requests) == 12 and all(r.expected_output_len == 5 for r in requests)
    # Group by the first 32 tokens: exactly 3 groups of 4, each sharing (nearly) the whole prefix.
    groups: dict[tuple, list] = {}
    for r in requests:
        groups.setdefault(tuple(r.prompt_token_ids[:32]), []).append(r.prompt_token_ids)
    assert sorted(len(g) for g in groups.values()) == [4, 4, 4]
    for group in groups.values():
        shared = min(_common_prefix(group[0], other) for other in group[1:])
        assert shared >= 62  # only the junction with the suffix may re-merge
        assert len({tuple(ids) for ids in group}) == 4  # each suffix is its own
    again = prefix_repetition_requests(
        tokenizer, 12, prefix_len=64, suffix_len=8, num_prefixes=3, output_len=5, seed=1
    )
    assert [r.prompt for r in again] == [r.prompt for r in requests]


def test_sharegpt_file(tokenizer, tmp_path):
    long_text = "Paged attention stores keys and values in fixed-size blocks. " * 4
    data = [
        {
            "id": str(i),
            "conversations": [
                {"from": "human", "value": f"{long_text} question {i}"},
                {"from": "gpt", "value": long_text},
            ],
        }
        for i in range(5)
    ] + [
        {
            "id": "short",
            "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}],
        },
        {"id": "one-turn", "conversations": [{"from": "human", "value": long_text}]},
        "not a conversation",
    ]
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(data))
    requests = sharegpt_requests(tokenizer, path, num_requests=10, seed=0)
    assert len(requests) == 5  # the short and the one-turn conversations are skipped
    assert all(
        r.expected_output_len == len(tokenizer.encode(long_text, add_special_tokens=False)) for r in requests
    )
    fixed = sharegpt_requests(tokenizer, path, num_requests=3, output_len=7, seed=0)
    assert [r.expected_output_len for r in fixed] == [7, 7, 7]
    assert [r.prompt for r in fixed] == [r.prompt for r in requests[:3]]
    with pytest.raises(FileNotFoundError, match="not found"):
        sharegpt_requests(tokenizer, tmp_path / "missing.json", 3)
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        sharegpt_requests(tokenizer, tmp_path / "bad.json", 3)


def test_parse_range():
    assert parse_range("128") == (128, 128)
    assert parse_range("32-512") == (32, 512)
    with pytest.raises(ValueError, match="MIN-MAX"):
        parse_range("a-b")


def test_poisson_arrivals_are_seeded_with_the_asked_rate():
    offsets = arrival_offsets(4001, request_rate=20.0, seed=7)
    assert offsets[0] == 0.0 and offsets == sorted(offsets)
    assert offsets == arrival_offsets(4001, request_rate=20.0, seed=7)
    gaps = np.diff(offsets)
    assert gaps.mean() == pytest.approx(1 / 20.0, rel=0.05)
    # Exponential gaps: the standard deviation equals the mean (coefficient of variation 1).
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.08)
    regular = np.diff(arrival_offsets(4001, request_rate=20.0, burstiness=16.0, seed=7))
    assert regular.std() / regular.mean() == pytest.approx(0.25, rel=0.1)
    assert arrival_offsets(3, request_rate=math.inf) == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="request rate"):
        arrival_offsets(3, request_rate=0.0)


def test_parse_concurrencies():
    assert parse_concurrencies(None) == [None]
    assert parse_concurrencies("64") == [64]
    assert parse_concurrencies("1,8,64") == [1, 8, 64]
    with pytest.raises(ValueError, match=">= 1"):
        parse_concurrencies("0")
