"""The process groups and collectives of tokenmill/distributed: identities in a world of one, and real gloo
collectives between 4 spawned processes on 127.0.0.1 (TP=2 x PP=2, vLLM's rank layout)."""

from __future__ import annotations

import multiprocessing
import traceback

import pytest
import torch

from tokenmill.distributed import parallel_state as ps


def test_a_world_of_one_communicates_nothing():
    assert not torch.distributed.is_initialized()
    x = torch.arange(6.0).reshape(2, 3)
    assert ps.tensor_model_parallel_all_reduce(x) is x
    assert ps.tensor_model_parallel_all_gather(x, 0) is x
    assert ps.tensor_model_parallel_gather(x, 0) is x
    assert ps.tensor_model_parallel_broadcast(x) is x
    tp, pp = ps.get_tp_group(), ps.get_pp_group()
    assert (tp.world_size, tp.rank_in_group, pp.world_size, ps.get_pp_reverse_group().world_size) == (1, 0, 1, 1)
    assert ps.get_parallel_config().is_output_rank
    assert not torch.distributed.is_initialized()


def test_parallel_config_checks_the_layout():
    config = ps.ParallelConfig(world_size=4, rank=3, tensor_parallel_size=2, pipeline_parallel_size=2,
                               distributed_init_method="tcp://127.0.0.1:1")
    assert (config.tp_rank, config.pp_rank, config.is_output_rank) == (1, 1, False)
    assert ps.output_rank(2, 2) == 2
    with pytest.raises(ValueError, match="world_size=3 must be tensor_parallel_size"):
        ps.ParallelConfig(world_size=3, tensor_parallel_size=2, distributed_init_method="tcp://127.0.0.1:1")
    with pytest.raises(ValueError, match="needs a distributed_init_method"):
        ps.ParallelConfig(world_size=2, tensor_parallel_size=2)


def _rank_main(rank: int, init_method: str, results) -> None:
    try:
        ps.init_distributed(ps.ParallelConfig(world_size=4, rank=rank, tensor_parallel_size=2,
                                              pipeline_parallel_size=2, distributed_init_method=init_method,
                                              timeout_s=60))
        tp, pp = ps.get_tp_group(), ps.get_pp_group()
        out: dict = {"tp_ranks": tp.ranks, "pp_ranks": pp.ranks}
        x = torch.full((2,), float(rank + 1))
        out["all_reduce"] = ps.tensor_model_parallel_all_reduce(x.clone()).tolist()
        out["all_gather"] = ps.tensor_model_parallel_all_gather(x.view(1, 2), dim=-1).tolist()
        gathered = ps.tensor_model_parallel_gather(x.view(1, 2), dst=0, dim=0)
        out["gather"] = None if gathered is None else gathered.tolist()
        out["broadcast"] = ps.tensor_model_parallel_broadcast(x.clone(), src=1).tolist()
        if pp.is_first_rank:
            pp.send_tensor_dict({"hidden": torch.full((2, 3), float(rank)), "ids": torch.arange(3)})
        else:
            received = pp.recv_tensor_dict()
            out["received"] = {k: v.tolist() for k, v in received.items()}
        # Non-blocking, into buffers of known shapes: two messages in a row on the pipeline group, and one back
        # on its twin for the other direction, all posted before any is waited for.
        reverse = ps.get_pp_reverse_group()
        out["pp_reverse_ranks"] = reverse.ranks
        if pp.is_first_rank:
            back = torch.empty(2, dtype=torch.long)
            works = pp.isend_tensors([torch.full((2,), float(rank)), torch.full((3,), rank + 0.5)])
            works += reverse.irecv_tensors([back], src=1)
            for work in works:
                work.wait()
            out["back"] = back.tolist()
        else:
            first, second = torch.empty(2), torch.empty(3)
            works = pp.irecv_tensors([first, second]) + reverse.isend_tensors([torch.tensor([rank, 7])], dst=0)
            for work in works:
                work.wait()
            out["isend"] = [first.tolist(), second.tolist()]
        ps.destroy_distributed()
        results.put((rank, out))
    except Exception:
        results.put((rank, traceback.format_exc()))


@pytest.mark.slow  # four spawned processes import torch (~6 s)
def test_collectives_between_four_processes():
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    init_method = f"tcp://127.0.0.1:{ps.get_open_port()}"
    processes = [context.Process(target=_rank_main, args=(r, init_method, results)) for r in range(4)]
    for p in processes:
        p.start()
    try:
        got = dict(results.get(timeout=120) for _ in processes)
    finally:
        for p in processes:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    for rank, out in got.items():
        assert isinstance(out, dict), out
        stage = rank // 2
        assert out["tp_ranks"] == [2 * stage, 2 * stage + 1] and out["pp_ranks"] == [rank % 2, rank % 2 + 2]
        first, second = 2 * stage + 1, 2 * stage + 2  # the values of the stage's two ranks
        assert out["all_reduce"] == [first + second] * 2
        assert out["all_gather"] == [[first, first, second, second]]
        assert out["gather"] == ([[first, first], [second, second]] if rank % 2 == 0 else None)
        assert out["broadcast"] == [second, second]
        assert out["pp_reverse_ranks"] == out["pp_ranks"]
        if stage == 1:
            assert out["received"] == {"hidden": [[rank - 2.0] * 3] * 2, "ids": [0, 1, 2]}
            assert out["isend"] == [[rank - 2.0] * 2, [rank - 1.5] * 3]
        else:
            assert out["back"] == [rank + 2, 7]
