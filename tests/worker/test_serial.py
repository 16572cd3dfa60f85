"""The msgpack encoder/decoder of the step contract: every type the contracts use comes back equal."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tokenmill.model.pooler import PooledChunk
from tokenmill.outputs import (
    CachedRequestData,
    Logprob,
    ModelRunnerOutput,
    NewRequestData,
    SampledToken,
    SchedulerOutput,
)
from tokenmill.request import RequestStatus
from tokenmill.sampling_params import SamplingParams
from tokenmill.structured_output.params import StructuredOutputsParams
from tokenmill.worker.serial import MsgpackDecoder, MsgpackEncoder, round_trip


def test_contract_types_round_trip():
    params = SamplingParams(temperature=0.7, stop=["\n"], seed=3, logprobs=2,
                            structured_outputs=StructuredOutputsParams(json={"type": "object"}))
    sched = SchedulerOutput(
        new_requests=[NewRequestData("a", [1, 2, 3], [9], params, [0], [4, 5], 0, 1, None, 0)],
        cached_requests=CachedRequestData(["b"], [[7]], [33]),
        num_scheduled_tokens={"a": 3, "b": 1}, total_num_scheduled_tokens=4,
        finished_request_ids=["c"], preempted_ids=["d"],
    )
    copy = round_trip(sched)
    assert copy == sched and list(copy.num_scheduled_tokens) == ["a", "b"]  # batch order kept
    assert copy.new_requests[0].sampling_params._stop_list == ["\n"]  # init=False fields travel
    out = ModelRunnerOutput({"a": SampledToken(5, {5: Logprob(-0.1, 1), 8: Logprob(-2.5, 2)}, -0.1)},
                            prompt_logprobs={"a": [{2: Logprob(-1.0, 3)}]}, processor_finished={"a": None})
    copy = round_trip(out)
    assert copy == out and isinstance(next(iter(copy.sampled["a"].logprobs)), int)


def test_arrays_tensors_and_containers_round_trip():
    value = {1: (2, 3), "s": {4, 5}, "f": frozenset({"x"}), "e": RequestStatus.FINISHED_LENGTH,
             "n": np.arange(6, dtype=np.int32).reshape(2, 3), "i": np.int64(7)}
    copy = round_trip(value)
    assert copy["e"] is RequestStatus.FINISHED_LENGTH and copy["i"] == 7
    assert (copy[1], copy["s"], copy["f"]) == ((2, 3), {4, 5}, frozenset({"x"}))
    assert copy["n"].dtype == np.int32 and (copy["n"] == value["n"]).all()
    chunk = round_trip(PooledChunk(1, 0, 4, torch.linspace(0, 1, 8)))
    assert isinstance(chunk.data, torch.Tensor) and torch.equal(chunk.data, torch.linspace(0, 1, 8))


def test_what_is_not_plain_data_is_refused():
    with pytest.raises(TypeError, match="cannot encode Generator"):
        MsgpackEncoder().encode({"g": torch.Generator()})
    with pytest.raises(TypeError, match="bfloat16"):
        MsgpackEncoder().encode(torch.zeros(2, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="only classes of"):
        MsgpackDecoder(allowed_modules=("tokenmill.outputs",)).decode(
            MsgpackEncoder().encode(RequestStatus.FINISHED_STOPPED))
