"""The cost of the process boundary: one engine step's EngineCoreOutputs serialized, sent over the ZeroMQ ipc://
socket the engine core process uses, received and deserialized; msgpack (tokenmill's wire format) vs pickle.

Each step message holds `batch` requests' outputs (one new token each, as in decode; optionally top-k logprobs),
their metrics, and the scheduler's stats. Sender and receiver sockets live in this process, so the time per
step is encode + send + the kernel's copy + receive + decode, without a second interpreter's scheduling noise.
Wall time and CPU time (of the whole process: ZeroMQ's I/O thread included) are both reported; on a machine
shared with other work the CPU time is the steadier measure of the cost.

    python benchmarks/engine_transport.py                 # batch 1 and 256
    python benchmarks/engine_transport.py --batch 1 64 256 --logprobs 5 --json
"""

from __future__ import annotations

import argparse
import json
import pickle
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import zmq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tokenmill.engine.messages import EngineCoreOutputs, MsgpackDecoder, MsgpackEncoder  # noqa: E402
from tokenmill.metrics.stats import SchedulerStats  # noqa: E402
from tokenmill.outputs import EngineCoreOutput, Logprob, RequestMetrics  # noqa: E402


def step_outputs(batch: int, logprobs: int) -> EngineCoreOutputs:
    outputs, metrics = [], {}
    for i in range(batch):
        request_id = f"cmpl-{i:032x}"
        positions = None
        if logprobs:
            positions = [{1000 + i + k: Logprob(-0.1 * (k + 1), k + 1) for k in range(logprobs + 1)}]
        outputs.append(EngineCoreOutput(request_id, [1000 + i], positions, None, None, None))
        metrics[request_id] = RequestMetrics(1.7e9, 1.7e9 + 0.01, 1.7e9 + 0.02, 1.7e9 + 0.5, None, 0.25, 16)
    stats = SchedulerStats(num_running=batch, num_waiting=0, kv_cache_usage=0.4, prefix_cache_queries=123456,
                           prefix_cache_hits=6543, num_preemptions=0, busy_seconds=12.5, num_steps=4567,
                           num_kv_blocks=65536, block_size=16)
    return EngineCoreOutputs(outputs, metrics, {}, stats, {}, time.time())


def measure(message: EngineCoreOutputs, codec: str, repeats: int) -> dict:
    directory = tempfile.mkdtemp(prefix="tokenmill-transport-")
    context = zmq.Context()
    pull = context.socket(zmq.PULL)
    push = context.socket(zmq.PUSH)
    address = f"ipc://{directory}/bench"
    pull.bind(address)
    push.connect(address)
    encoder, decoder = MsgpackEncoder(), MsgpackDecoder()
    if codec == "msgpack":
        def encode(m):
            return encoder.encode_outputs(m)

        def decode(b):
            return decoder.decode(b)[1]
    else:
        def encode(m):
            return pickle.dumps(m, protocol=pickle.HIGHEST_PROTOCOL)

        def decode(b):
            return pickle.loads(b)
    size = len(encode(message))
    times, encode_times, cpu_times = [], [], []
    try:
        for _ in range(repeats + 20):
            cpu_start = time.process_time()
            start = time.perf_counter()
            data = encode(message)
            encoded = time.perf_counter()
            push.send(data, copy=False)
            frame = pull.recv(copy=False)
            decoded = decode(frame.buffer)
            end = time.perf_counter()
            cpu_times.append(time.process_time() - cpu_start)
            times.append(end - start)
            encode_times.append(encoded - start)
        assert len(decoded.outputs) == len(message.outputs)
    finally:
        push.close(linger=0)
        pull.close(linger=0)
        context.term()
        shutil.rmtree(directory, ignore_errors=True)
    times, encode_times, cpu_times = times[20:], encode_times[20:], cpu_times[20:]
    return {"codec": codec, "bytes": size, "median_us": 1e6 * statistics.median(times),
            "cpu_median_us": 1e6 * statistics.median(cpu_times),
            "p90_us": 1e6 * sorted(times)[int(0.9 * len(times))], "encode_median_us": 1e6 * statistics.median(encode_times)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 256], help="requests per step message")
    parser.add_argument("--logprobs", type=int, default=0, help="top logprobs per token (0: none)")
    parser.add_argument("--repeats", type=int, default=2000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    rows = []
    for batch in args.batch:
        message = step_outputs(batch, args.logprobs)
        # Interleaved, so that both codecs see the same machine load.
        for codec in ("msgpack", "pickle"):
            rows.append({"batch": batch, "logprobs": args.logprobs, **measure(message, codec, args.repeats)})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'batch':>5} {'codec':>8} {'bytes':>8} {'median us':>10} {'p90 us':>8} {'cpu us':>8} {'encode us':>10}")
    for r in rows:
        print(f"{r['batch']:5d} {r['codec']:>8} {r['bytes']:8d} {r['median_us']:10.1f} {r['p90_us']:8.1f} "
              f"{r['cpu_median_us']:8.1f} {r['encode_median_us']:10.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
