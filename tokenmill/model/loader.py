"""Load a Hugging Face model directory (config.json + *.safetensors) into a tokenmill model."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from tokenmill.attention.backend import AttentionBackend
from tokenmill.model.llama import LlamaForCausalLM, RotaryEmbedding
from tokenmill.model.quantization import resolve_quantization
from tokenmill.model.registry import DecoderSpec


def read_hf_config(model_dir: Path) -> dict[str, Any]:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: a model directory needs a Hugging Face config.json")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(
            f"{path} is not valid JSON ({e}): restore the file from the model's original release"
        ) from e
    if not isinstance(config, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return config


def safetensors_files(model_dir: Path) -> list[Path]:
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index} is not a valid safetensors index (needs a 'weight_map'): {e}") from e
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{index} names weight files that are missing: {', '.join(missing)}")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(
            f"no *.safetensors weights in {model_dir}: tokenmill loads safetensors checkpoints "
            "(re-save a PyTorch .bin checkpoint with save_pretrained(safe_serialization=True)) or a .gguf file"
        )
    return files


def iter_safetensors(files: list[Path], show_progress: bool,
                     keep: Callable[[str], bool] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of the files, by name; with `keep`, only the names it accepts are read at all (a pipeline
    stage reads its own layers' tensors, never the other stages')."""
    handles = []
    total = 0
    for path in files:
        try:
            handle = safe_open(str(path), framework="pt")
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise ValueError(
                f"{path}: cannot read safetensors weights ({e}); the file is corrupt or truncated"
            ) from e
        keys = [key for key in handle.keys() if keep is None or keep(key)]
        handles.append((path, handle, keys))
        total += len(keys)
    # No bar at all without progress: even a disabled tqdm creates a multiprocessing lock, a semaphore that a
    # worker process would leave behind for the resource tracker to warn about.
    bar = tqdm(total=total, desc="Loading weights", unit="tensor") if show_progress else None
    try:
        for path, handle, keys in handles:
            for key in keys:
                try:
                    tensor = handle.get_tensor(key)
                except Exception as e:
                    raise ValueError(
                        f"{path}: tensor {key!r} cannot be read ({e}); the file is corrupt"
                    ) from e
                yield key, tensor
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()


def materialize_empty(model: torch.nn.Module, device: torch.device) -> None:
    """Give every meta-device parameter and buffer of model uninitialized storage on `device` (what
    Module.to_empty does, without its empty_like on meta tensors, whose first call imports sympy through torch's
    symbolic shapes: seconds of start-up in every worker process)."""
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is not None and param.device.type == "meta":
                module._parameters[name] = torch.nn.Parameter(
                    torch.empty(param.shape, dtype=param.dtype, device=device), requires_grad=param.requires_grad)
        for name, buffer in list(module._buffers.items()):
            if buffer is not None and buffer.device.type == "meta":
                module._buffers[name] = torch.empty(buffer.shape, dtype=buffer.dtype, device=device)


def load_model(
    model_dir: Path,
    backend: AttentionBackend,
    dtype: torch.dtype,
    device: torch.device,
    max_positions: int,
    show_progress: bool = True,
    quantization: str | None = None,
) -> LlamaForCausalLM:
    """The model of model_dir, its layers built with the quantization method of the checkpoint (config.json's
    quantization_config) or of `quantization` (vLLM's --quantization; int8/int4 quantize a full-precision
    checkpoint at load), weights streamed in and repacked for their kernels."""
    config = read_hf_config(model_dir)
    source = str(Path(model_dir) / "config.json")
    spec = DecoderSpec.from_hf_config(config, source=source)
    quant_config = resolve_quantization(config, quantization, source)
    if quant_config is not None:
        quant_config.check_dtype(dtype)
    files = safetensors_files(model_dir)
    with torch.device("meta"):
        model = LlamaForCausalLM(spec, backend, max_positions, quant_config, dtype)
    # Allocate real storage without random initialization: every parameter is overwritten by the checkpoint.
    materialize_empty(model, device)
    model.rotary = RotaryEmbedding(spec, max_positions).to(device)
    with torch.no_grad():
        loaded = model.load_weights(iter_safetensors(files, show_progress, keep=model.holds_weight))
    missing = model.expected_weight_names() - loaded
    if missing:
        shown = ", ".join(sorted(missing)[:5])
        raise ValueError(
            f"{model_dir}: {len(missing)} weight tensors are missing from the checkpoint ({shown}"
            f"{', ...' if len(missing) > 5 else ''}); the download is incomplete or the files do not match config.json"
        )
    with torch.no_grad():
        model.process_weights_after_loading()
    return model.eval()
