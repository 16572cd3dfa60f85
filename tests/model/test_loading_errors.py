"""Broken model directories fail with an error that names the file and the problem."""

from __future__ import annotations

import json
import shutil

import pytest

from tokenmill import LLM


def copy_model(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_missing_config(tmp_path, llama_dir):
    d = copy_model(llama_dir, tmp_path / "m")
    (d / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        LLM(str(d), show_progress=False)


def test_corrupt_config(tmp_path, llama_dir):
    d = copy_model(llama_dir, tmp_path / "m")
    (d / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config.json is not valid JSON"):
        LLM(str(d), show_progress=False)


def test_unknown_architecture(tmp_path, llama_dir):
    d = copy_model(llama_dir, tmp_path / "m")
    config = json.loads((d / "config.json").read_text())
    config["model_type"] = "gpt_neox"
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"model_type 'gpt_neox' is not supported.*llama"):
        LLM(str(d), show_progress=False)


def test_missing_config_field(tmp_path, llama_dir):
    d = copy_model(llama_dir, tmp_path / "m")
    config = json.loads((d / "config.json").read_text())
    del config["num_hidden_layers"]
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="num_hidden_layers"):
        LLM(str(d), show_progress=False)


def test_no_weights(tmp_path, llama_dir):
    d = copy_model(llama_dir, tmp_path / "m")
    (d / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"no \*\.safetensors weights in"):
        LLM(str(d), show_progress=False)


def test_corrupt_weights(tmp_path, llama_dir):
    d = copy_model(llama_dir, tmp_path / "m")
    (d / "model.safetensors").write_bytes(b"\x00garbage" * 100)
    with pytest.raises(ValueError, match=r"model.safetensors.*corrupt"):
        LLM(str(d), show_progress=False)


def test_missing_tensor(tmp_path, llama_dir):
    from safetensors.torch import load_file, save_file

    d = copy_model(llama_dir, tmp_path / "m")
    tensors = load_file(d / "model.safetensors")
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, d / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing from the checkpoint \(layers.1.mlp.down_proj.weight"):
        LLM(str(d), show_progress=False)


def test_missing_model_path(tmp_path):
    with pytest.raises(FileNotFoundError):
        LLM(str(tmp_path / "nowhere"), show_progress=False)


def test_pipeline_parallel_size_over_the_layers(llama_dir):
    with pytest.raises(ValueError, match="pipeline_parallel_size=5 exceeds the 2 decoder layers.*use 1 to 2"):
        LLM(str(llama_dir), pipeline_parallel_size=5, show_progress=False)


def test_max_model_len_over_model_limit(llama_dir):
    with pytest.raises(ValueError, match=r"max_model_len=100000 exceeds the model's limit of 512"):
        LLM(str(llama_dir), max_model_len=100000, show_progress=False)
