"""EngineArgs: the one list of engine arguments (vLLM's name).

Each field is documented by the string under it; that text is the flag's --help. From these fields come:
- the engine flags of `tokenmill serve`, `generate`, `chat` and `bench throughput` (add_cli_args: --max-model-len
  for max_model_len; a bool that defaults to False is a switch, one that defaults to True or None gets --no-X too);
- the keyword arguments of LLM(...) (the same names);
- EngineConfig (create_engine_config: every default resolved by config.resolve_defaults(), the one place). An EngineArgs field goes to
  the sub-config (ModelConfig, CacheConfig, SchedulerConfig, ...) that has a field of the same name, so a new
  engine option is one field here and one in its config.

What a flag needs beyond its type (choices, a short alias, a value converter) is in the field's metadata.
The KV cache size on a GPU is not a default but a measurement (a profiled forward): the worker that owns the
device makes it.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokenmill.config import (
    CacheConfig,
    EngineConfig,
    ModelConfig,
    SchedulerConfig,
    StructuredOutputsConfig,
    batch_invariant_from_env,
    resolve_defaults,
)


@dataclass
class EngineArgs:
    model: str | None = field(default=None, metadata={"positional": True})
    """Hugging Face model directory, .gguf file or hub id such as Qwen/Qwen2.5-0.5B-Instruct (default: bundled
    SmolLM2-135M-Instruct)"""

    revision: str | None = None
    """hub ids: the branch, tag or commit to load (default: main)"""

    download_dir: str | None = None
    """hub ids: the Hugging Face cache directory to download into and load from (default: $HF_HUB_CACHE,
    $HF_HOME/hub or ~/.cache/huggingface/hub); HF_HUB_OFFLINE=1 only reads it"""

    dtype: str = field(default="auto", metadata={"choices": ["auto", "bfloat16", "float16", "float32"]})
    """weights and activations dtype; auto = bf16 where the hardware runs it fast"""

    max_model_len: int | None = None
    """longest prompt + output in tokens (default: the model's limit, capped by the KV cache)"""

    max_num_seqs: int = 256
    """most requests in one batch"""

    max_num_batched_tokens: int | None = None
    """most tokens computed per engine step (default 2048 on CPU, 8192 on CUDA)"""

    block_size: int = 16
    """tokens per KV cache block"""

    kv_cache_memory: int | str | None = None
    """KV cache size in bytes or with a unit, e.g. 2GiB (CPU default: 4 GiB or 1/4 of RAM)"""

    gpu_memory_utilization: float = 0.9
    """fraction of GPU memory the engine may use (CUDA)"""

    enable_prefix_caching: bool = True
    """reuse KV blocks of shared prompt prefixes"""

    num_gpu_blocks_override: int | None = None
    """exactly this many KV cache blocks per rank, whatever the memory budget (testing and experiments)"""

    seed: int = 0
    """seed for requests without their own"""

    device: str = field(default="auto", metadata={"choices": ["auto", "cpu", "cuda"]})
    """where the model runs"""

    tensor_parallel_size: int = field(default=1, metadata={"aliases": ["-tp"]})
    """number of devices (worker processes) to shard every layer over: heads, MLP and vocabulary split, an
    all-reduce after each row-parallel projection"""

    pipeline_parallel_size: int = field(default=1, metadata={"aliases": ["-pp"]})
    """number of pipeline stages to split the decoder layers over (at most the model's layers): each stage holds
    its layers' weights and KV cache, activations travel from stage to stage, each step in as many microbatches"""

    distributed_executor_backend: str | None = field(default=None, metadata={"choices": ["uni", "mp", "ray"]})
    """where the workers (model, KV cache, model runner) run: uni, in the engine core's process (one rank); mp,
    in child processes, one per rank, driven through the serialized step contract; ray, in Ray actors placed on
    the nodes of a Ray cluster (RAY_ADDRESS, else a running local one, else one started for the engine)
    (default: uni for one rank, mp for more)"""

    enforce_eager: bool = False
    """CUDA: always run eagerly, never replay captured CUDA graphs for decode steps"""

    async_scheduling: bool = False
    """launch each step before the previous one's tokens reach the host, hiding the scheduling and output work
    behind the GPU's (one wasted token per stop)"""

    pooling_type: str = field(default="LAST", metadata={"type": str.upper, "choices": ["LAST", "MEAN"]})
    """how /v1/embeddings pools the prompt's final hidden states: the last token's, or their mean (vectors are
    L2-normalized)"""

    batch_invariant: bool | None = None
    """kernels whose results do not depend on the batch: greedy and seeded outputs are identical whatever else
    runs, at a cost in throughput (CPU only; default: the TOKENMILL_BATCH_INVARIANT environment variable, else
    off)"""

    quantization: str | None = field(default=None, metadata={"type": str.lower, "aliases": ["-q"]})
    """weight format: default the checkpoint's own (GGUF files run kept quantized); int8 / int4 quantize a
    full-precision checkpoint at load (weight-only, round to nearest)"""

    structured_outputs_backend: str = field(default="auto", metadata={
        "choices": ["auto", "xgrammar", "guidance"], "config": ("structured_outputs", "backend")})
    """grammar library for structured outputs (JSON schema, regex, choice, grammar): auto uses xgrammar, and
    llguidance where xgrammar cannot enforce the specification"""

    structured_outputs_compile_timeout: float = field(default=10.0, metadata={
        "metavar": "SECONDS", "config": ("structured_outputs", "compile_timeout_s")})
    """seconds a request's grammar may take to compile; past it that request fails alone"""

    chat_template: str | None = None
    """Jinja chat template (a file path or the template text) overriding the model's"""

    # ---- flags ----------------------------------------------------------------------------------------------
    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        """Add one flag per field (the model as the positional argument), named as `vllm serve`'s."""
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            meta = dict(f.metadata)
            kwargs: dict[str, Any] = {"default": f.default, "help": docs.get(f.name)}
            if meta.get("positional"):
                parser.add_argument(f.name, nargs="?", **kwargs)
                continue
            kind, optional = _flag_type(cls, f.name)
            if kind is bool:
                kwargs["action"] = "store_true" if f.default is False else argparse.BooleanOptionalAction
            else:
                kwargs["type"] = meta.get("type", kind)
                for key in ("choices", "metavar"):
                    if key in meta:
                        kwargs[key] = meta[key]
            names = ["--" + f.name.replace("_", "-"), *meta.get("aliases", [])]
            parser.add_argument(*names, dest=f.name, **kwargs)
        return parser

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> EngineArgs:
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})

    @classmethod
    def from_kwargs(cls, model: str | None = None, **kwargs: Any) -> EngineArgs:
        """EngineArgs from LLM(...)-style keywords; an unknown keyword is a TypeError naming the known ones."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise TypeError(f"unknown engine argument(s) {', '.join(unknown)}: the engine arguments are "
                            f"{', '.join(sorted(names))}")
        return cls(model=model, **kwargs)

    def kwargs(self) -> dict[str, Any]:
        """The LLM(...) keyword arguments, the model left out."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "model"}

    # ---- the config -------------------------------------------------------------------------------------------
    def create_engine_config(self) -> EngineConfig:
        """The validated EngineConfig, with every default that does not need the device resolved here."""
        values = self.resolved()
        sections: dict[str, dict[str, Any]] = {name: {} for name in _SECTIONS}
        top: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            target = f.metadata.get("config") or _target(f.name)
            if target is None:
                top[f.name] = values[f.name]
            else:
                section, name = target
                sections[section][name] = values[f.name]
        config = EngineConfig(**{name: _SECTIONS[name](**kw) for name, kw in sections.items()}, **top)
        return resolve_defaults(config)

    def resolved(self) -> dict[str, Any]:
        """The field values as EngineConfig takes them: paths as strings, batch_invariant None read from
        TOKENMILL_BATCH_INVARIANT, a chat template file read. The engine's defaults (device, dtype,
        max_num_batched_tokens, the CPU KV cache budget) are resolved by config.resolve_defaults()."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if values["model"] is not None:
            values["model"] = str(values["model"])
        if values["download_dir"] is not None:
            values["download_dir"] = str(values["download_dir"])
        if values["batch_invariant"] is None:
            values["batch_invariant"] = batch_invariant_from_env()
        values["pooling_type"] = str(values["pooling_type"]).upper()
        values["chat_template"] = resolve_chat_template(values["chat_template"])
        return values


# EngineConfig's sub-configs by their field name in EngineConfig.
_SECTIONS: dict[str, type] = {
    "model": ModelConfig, "cache": CacheConfig, "scheduler": SchedulerConfig,
    "structured_outputs": StructuredOutputsConfig,
}


@functools.cache
def _section_fields() -> dict[str, str]:
    """Config field name -> the EngineConfig section that has it."""
    owners: dict[str, str] = {}
    for section, cls in _SECTIONS.items():
        for f in dataclasses.fields(cls):
            owners.setdefault(f.name, section)
    return owners


def _target(name: str) -> tuple[str, str] | None:
    """(section, field) an EngineArgs field goes to; None: a field of EngineConfig itself."""
    section = _section_fields().get(name)
    if section is not None:
        return section, name
    if name in {f.name for f in dataclasses.fields(EngineConfig)}:
        return None
    raise TypeError(f"EngineArgs.{name} has no field of the same name in EngineConfig or its sections: add one, "
                    "or name its target in the field's metadata ('config': (section, field))")


def resolve_chat_template(value: str | None) -> str | None:
    """A chat template given as a file path is read; anything else is the template text itself."""
    if value is None:
        return None
    try:
        path = Path(value).expanduser()
        if len(value) < 4096 and "\n" not in value and path.is_file():
            return path.read_text()
    except OSError:
        pass
    return value


def _flag_type(cls: type, name: str) -> tuple[type, bool]:
    """(the flag's value type, whether None is allowed) from the field's annotation; int | str takes a str."""
    hint = typing.get_type_hints(cls)[name]
    args = typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union \
        else (hint,)
    kinds = [a for a in args if a is not type(None)]
    optional = len(kinds) < len(args)
    if bool in kinds:
        return bool, optional
    if str in kinds:
        return str, optional
    return kinds[0], optional


_FIELD_DOCS: dict[type, dict[str, str]] = {}


def field_docs(cls: type) -> dict[str, str]:
    """Field name -> the string literal right under the field in the class body (or a base class's), whitespace
    folded."""
    if cls not in _FIELD_DOCS:
        docs: dict[str, str] = {}
        for klass in reversed(cls.__mro__):
            if dataclasses.is_dataclass(klass):
                docs.update(_read_field_docs(klass))
        _FIELD_DOCS[cls] = docs
    return _FIELD_DOCS[cls]


def _read_field_docs(cls: type) -> dict[str, str]:
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    body = ast.parse(source).body[0]
    assert isinstance(body, ast.ClassDef)
    docs = {}
    statements = body.body
    for node, after in zip(statements, statements[1:], strict=False):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs
