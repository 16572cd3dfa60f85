"""Cost of the process boundary between the engine core and a worker: encoding, decoding and moving one
step's SchedulerOutput and ModelRunnerOutput (tokenmill/worker/serial.py, msgpack) at batch 1 and 256.

    python benchmarks/step_serialization.py                 # batch 1 and 256, 512-token prompts
    python benchmarks/step_serialization.py --batches 1,64,256 --json out.json

The messages are real ones: a scheduler (no model) schedules `batch` requests (first step: every request new,
its prompt and sampling params included), then a steady decode step (diffs only). Runner outputs are one
sampled token per request, without and with logprobs (top 5). `pipe` is a round trip of the encoded bytes
through a multiprocessing Pipe to a spawned echo process (what MultiprocExecutor uses), minus nothing: the
transport cost as the engine sees it, for the bytes of that message.
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tokenmill.core.kv_cache_manager import KVCacheManager  # noqa: E402
from tokenmill.core.scheduler import Scheduler  # noqa: E402
from tokenmill.outputs import Logprob, ModelRunnerOutput, SampledToken  # noqa: E402
from tokenmill.request import Request  # noqa: E402
from tokenmill.sampling_params import SamplingParams  # noqa: E402
from tokenmill.worker.serial import MsgpackDecoder, MsgpackEncoder  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="1,256", help="comma-separated batch sizes")
    p.add_argument("--context", type=int, default=512, help="prompt tokens per request")
    p.add_argument("--repeats", type=int, default=200, help="timed repetitions (median reported)")
    p.add_argument("--json", help="also write the results here")
    return p.parse_args(argv)


def messages(batch: int, context: int) -> dict[str, object]:
    """label -> a real message of that kind at this batch size."""
    block_size = 16
    blocks_per_request = context // block_size + 4
    scheduler = Scheduler(KVCacheManager(batch * blocks_per_request, block_size, False), batch,
                          batch * context, context + 64)
    for i in range(batch):
        params = SamplingParams(temperature=0.8, top_p=0.95, max_tokens=64, seed=i)
        scheduler.add_request(Request(f"cmpl-{i:08d}-0", [(i * 7 + t) % 32000 for t in range(context)], params,
                                      frozenset({2})))
    first = scheduler.schedule()
    scheduler.on_launched(first)
    sampled = {rid: SampledToken(100 + i) for i, rid in enumerate(scheduler.sampling_request_ids())}
    scheduler.update_from_output(first, ModelRunnerOutput(sampled), 0.0)
    decode = scheduler.schedule()
    with_logprobs = {
        rid: SampledToken(t.token_id, {t.token_id + k: Logprob(-0.5 - k, k + 1) for k in range(6)}, -0.5)
        for rid, t in sampled.items()
    }
    return {
        "SchedulerOutput, first step (new requests)": first,
        "SchedulerOutput, decode step (diffs)": decode,
        "ModelRunnerOutput": ModelRunnerOutput(sampled),
        "ModelRunnerOutput, logprobs=5": ModelRunnerOutput(with_logprobs),
    }


def _echo(conn) -> None:
    while True:
        data = conn.recv_bytes()
        if not data:
            return
        conn.send_bytes(data)


def median_us(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    encoder, decoder = MsgpackEncoder(), MsgpackDecoder()
    context = multiprocessing.get_context("spawn")
    conn, child = context.Pipe()
    echo = context.Process(target=_echo, args=(child,), daemon=True)
    echo.start()
    rows = []
    all_messages = {batch: messages(batch, args.context) for batch in (int(b) for b in args.batches.split(","))}
    # As the engine and the worker process do after start-up: long-lived objects out of the collector's way.
    gc.collect()
    gc.freeze()
    try:
        for batch, batch_messages in all_messages.items():
            for label, message in batch_messages.items():
                data = encoder.encode(message)
                assert decoder.decode(data) == message

                def pipe(data=data) -> None:
                    conn.send_bytes(data)
                    conn.recv_bytes()

                rows.append({
                    "batch": batch, "message": label, "bytes": len(data),
                    "encode_us": median_us(lambda m=message: encoder.encode(m), args.repeats),
                    "decode_us": median_us(lambda d=data: decoder.decode(d), args.repeats),
                    "pipe_round_trip_us": median_us(pipe, args.repeats),
                })
    finally:
        conn.send_bytes(b"")
        echo.join(timeout=5)
    print(f"{'batch':>5}  {'message':<44} {'bytes':>9} {'encode us':>10} {'decode us':>10} {'pipe rt us':>10}")
    for r in rows:
        print(f"{r['batch']:>5}  {r['message']:<44} {r['bytes']:>9} {r['encode_us']:>10.1f} {r['decode_us']:>10.1f} "
              f"{r['pipe_round_trip_us']:>10.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "machine": platform.processor() or platform.machine(), "date": time.strftime("%Y-%m-%d"),
            "context": args.context, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
