"""Quality of the quantized formats against full precision on the bundled model (tokenmill bench quality).

    python benchmarks/quant_quality.py                       # 64 prompts, 128 tokens, ~15 minutes on 2 cores
    python benchmarks/quant_quality.py --json quant_quality.json

The reference is SmolLM2-135M-Instruct in bfloat16: the bundled Q4_1 GGUF dequantized (its original bf16 weights
are not shipped), so "gguf (as stored)" measures what running the Q4_1 blocks packed costs against their exact
dequantized values, and int8 / int4 what re-quantizing those weights at load costs. Metrics: see
tokenmill/benchmarks/quality.py.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


def main(argv: list[str] | None = None) -> int:
    from tokenmill.benchmarks.quality import DEFAULT_PROMPTS, format_results, results_json, run

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--quantization", default="int8,int4")
    parser.add_argument("--json", dest="json_path", default=None)
    args = parser.parse_args(argv)
    methods = [m for m in args.quantization.split(",") if m]
    results = run(None, methods, DEFAULT_PROMPTS[: args.num_prompts], args.max_tokens, "bfloat16")
    print(format_results(results))
    if args.json_path:
        Path(args.json_path).write_text(json.dumps({"benchmark": "quant_quality", "args": vars(args),
                                                    "results": results_json(results)}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
