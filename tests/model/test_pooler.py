"""The Pooler folds prefill chunks in prompt order, and starts over after a preemption."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tokenmill.model.pooler import Pooler, pool_chunk
from tokenmill.pooling_params import PoolingParams


def chunks(hidden: torch.Tensor, bounds: list[int], pooling_type: str, epoch: int = 0):
    n = hidden.shape[0]
    return [pool_chunk(hidden[a:b], pooling_type, epoch, a, n) for a, b in zip(bounds, bounds[1:])]


@pytest.mark.parametrize("pooling_type", ["LAST", "MEAN"])
def test_chunks_fold_to_the_whole_prompt(pooling_type):
    hidden = torch.randn(10, 8)
    pooler = Pooler(PoolingParams(pooling_type=pooling_type, normalize=False), 10)
    for chunk in chunks(hidden, [0, 3, 7, 10], pooling_type):
        assert not pooler.done
        pooler.add(chunk)
    expected = hidden[-1] if pooling_type == "LAST" else hidden.mean(0)
    torch.testing.assert_close(pooler.result(), expected)


def test_preemption_starts_over_with_other_chunks():
    """A preempted request computes its prompt again in other chunks; a chunk of the earlier computation that
    arrives late (async scheduling) is dropped, and the result is the mean of each position once."""
    hidden = torch.randn(12, 8)
    pooler = Pooler(PoolingParams(pooling_type="MEAN"), 12)
    first = chunks(hidden, [0, 5, 9, 12], "MEAN", epoch=0)
    pooler.add(first[0])
    again = chunks(hidden, [0, 7, 12], "MEAN", epoch=1)
    pooler.add(again[0])
    pooler.add(first[1])  # stale: launched before the preemption
    assert not pooler.done
    pooler.add(again[1])
    torch.testing.assert_close(pooler.result(), F.normalize(hidden.mean(0), dim=-1))


def test_result_before_done_raises():
    pooler = Pooler(PoolingParams(pooling_type="MEAN"), 4)
    pooler.add(pool_chunk(torch.randn(2, 8), "MEAN", 0, 0, 4))
    with pytest.raises(RuntimeError, match="2 of 4"):
        pooler.result()
    with pytest.raises(RuntimeError, match="does not follow"):
        pooler.add(pool_chunk(torch.randn(1, 8), "MEAN", 0, 3, 4))
