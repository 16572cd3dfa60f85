"""Where the peer benchmarks find SmolLM2-135M-Instruct in each engine's format (for setup.sh and run.py).

- tokenmill at q4_1: the directory tokenmill converts the bundled Q4_1 GGUF into, `prepare_model(None)`
  (weights kept as their Q4_1 / Q8_0 blocks).
- tokenmill at bfloat16 / float32 and transformers: the same GGUF converted with its weights dequantized to
  bfloat16 (hf_model_dir).
- llama-cpp-python: the bundled GGUF itself (Q4_1 weights).
- CTranslate2: that HF-style directory converted with its TransformersConverter (float32 weights on disk;
  run.py picks the compute type when it loads the model).
"""

from __future__ import annotations

from pathlib import Path


def quantized_model_dir() -> Path:
    from tokenmill.model.default_model import prepare_model

    return prepare_model(None)


def hf_model_dir() -> Path:
    """The bundled GGUF as a plain Hugging Face directory (bfloat16 weights), converted once."""
    from tokenmill.model.default_model import cache_dir
    from tokenmill.model.gguf import convert_gguf_to_hf

    out = cache_dir() / "peers" / f"{quantized_model_dir().name}-bf16"
    if not (out / "config.json").is_file():
        staging = out.with_name(out.name + ".tmp")
        convert_gguf_to_hf(gguf_path(), staging, show_progress=False, keep_quantized=False)
        staging.rename(out)
    return out


def gguf_path() -> Path:
    from tokenmill.model.default_model import find_default_gguf

    return find_default_gguf()


def ct2_model_dir() -> Path:
    from tokenmill.model.default_model import cache_dir

    return cache_dir() / "peers" / f"{hf_model_dir().name}-ct2"


def convert_ct2(hf_dir: Path, out_dir: Path) -> Path:
    """Convert an HF-style Llama directory to CTranslate2 format once (a finished directory is reused)."""
    if (out_dir / "model.bin").is_file():
        return out_dir
    from ctranslate2.converters import TransformersConverter

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # No quantization on disk: the compute type (float32 or int8) is chosen when the model is loaded.
    TransformersConverter(str(hf_dir), low_cpu_mem_usage=True).convert(str(out_dir), force=True)
    return out_dir
