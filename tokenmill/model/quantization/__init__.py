"""Quantization methods, by vLLM's names: the config of the checkpoint (or of --quantization) picks a
LinearMethod for every linear layer at construction (see base.py)."""

from __future__ import annotations

from typing import Any

from tokenmill.model.quantization import (  # noqa: F401  (register their methods)
    awq,
    compressed_tensors,
    fp8,
    gguf,
    gptq,
    rtn,
    unquantized,
)
from tokenmill.model.quantization.base import (
    LinearMethod,
    QuantizationConfig,
    get_quantization_config_class,
    quantization_methods,
    register_quantization_config,
)

__all__ = ["LinearMethod", "QuantizationConfig", "get_quantization_config_class", "quantization_methods",
           "register_quantization_config", "resolve_quantization"]


def resolve_quantization(hf_config: dict[str, Any], requested: str | None,
                         source: str = "config.json") -> QuantizationConfig | None:
    """The QuantizationConfig a model is built with, or None for full precision.

    The checkpoint's quantization_config.quant_method decides when present; `requested` (--quantization) must
    then agree with it. Without one, `requested` names a quantize-at-load method (int8, int4, ...) or nothing.
    """
    checkpoint = hf_config.get("quantization_config")
    if checkpoint is not None and not isinstance(checkpoint, dict):
        raise ValueError(f"{source}: quantization_config must be a JSON object")
    found = str(checkpoint.get("quant_method", "")).lower() if checkpoint else None
    if requested is not None:
        requested = requested.lower()
        get_quantization_config_class(requested)  # rejects unknown names, listing the known ones
    if found:
        cls = get_quantization_config_class_for_checkpoint(found, source)
        if requested is not None and requested != cls.name and requested != found:
            raise ValueError(
                f"quantization={requested!r} contradicts the checkpoint, which is {found}-quantized "
                f"({source}: quantization_config.quant_method): drop --quantization or pass {cls.name!r}"
            )
        return cls.from_config(checkpoint or {})
    if requested is None or requested == "unquantized":
        return None
    cls = get_quantization_config_class(requested)
    if cls().quantizes_checkpoint():
        raise ValueError(
            f"quantization={requested!r} needs a {requested}-quantized checkpoint, but {source} has no "
            f"quantization_config: load a {requested} checkpoint, or quantize this one at load with "
            "quantization='int8' or 'int4'"
        )
    return cls.from_config({})


def get_quantization_config_class_for_checkpoint(quant_method: str, source: str) -> type[QuantizationConfig]:
    try:
        return get_quantization_config_class(quant_method)
    except ValueError:
        raise ValueError(
            f"{source}: quantization_config.quant_method={quant_method!r} is not supported; tokenmill loads "
            f"{', '.join(quantization_methods())}"
        ) from None
