"""Hugging Face hub ids ("Qwen/Qwen2.5-0.5B-Instruct"): resolved to a snapshot directory of the local HF cache,
downloaded first when the hub is reachable, as vLLM and transformers do.

The cache is huggingface_hub's (models--org--name/snapshots/<commit>/, refs/<branch>): $HF_HUB_CACHE, else
$HF_HOME/hub, else ~/.cache/huggingface/hub, or download_dir when given. HF_HUB_OFFLINE=1 never touches the
network; HF_TOKEN authenticates for private and gated repositories.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

logger = logging.getLogger("tokenmill")

# What a model directory needs: config, weights, tokenizer and generation files, chat templates. Not the
# PyTorch .bin, TF, Flax, ONNX or GGUF copies many repositories also hold.
_ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.model", "*.txt", "tokenizer*"]
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?$")


def looks_like_repo_id(model: str) -> bool:
    """Whether `model` could name a hub repository ("org/name" or "name"), not a path."""
    return bool(_REPO_ID.match(model)) and not model.endswith((".gguf", ".json")) and ".." not in model


def hub_cache_dir(download_dir: str | os.PathLike[str] | None = None) -> Path:
    """The HF cache in use: download_dir, $HF_HUB_CACHE, $HF_HOME/hub or ~/.cache/huggingface/hub (read now, not
    when huggingface_hub was imported)."""
    if download_dir is not None:
        return Path(download_dir).expanduser()
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface"
    )
    return Path(home).expanduser() / "hub"


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def resolve_hub_model(
    repo_id: str, revision: str | None = None, download_dir: str | os.PathLike[str] | None = None
) -> Path:
    """The local snapshot directory of `repo_id` at `revision` (a branch, tag or commit; default "main").

    Online, missing files are downloaded into the cache first; offline (HF_HUB_OFFLINE=1) or when the hub cannot
    be reached, the cached snapshot is used. FileNotFoundError, saying why and how to fix it, when neither works.
    """
    import huggingface_hub
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    cache = hub_cache_dir(download_dir)
    offline = _offline()
    at = f" at revision {revision!r}" if revision else ""
    fixes = (
        f"download it (`hf download {repo_id}{f' --revision {revision}' if revision else ''}`"
        f"{f' --cache-dir {cache}' if download_dir is not None else ''}, or run once with HF_HUB_OFFLINE=0 "
        "on a machine that reaches huggingface.co), or pass a local model directory or .gguf file"
    )
    try:
        path = huggingface_hub.snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=str(cache),
            local_files_only=offline,
            allow_patterns=_ALLOW_PATTERNS,
            token=os.environ.get("HF_TOKEN") or None,
        )
    except GatedRepoError as e:
        raise FileNotFoundError(
            f"Model {repo_id!r} is a gated repository on the Hugging Face hub and is not in the cache at {cache}: "
            f"accept its terms on huggingface.co and set HF_TOKEN to a token of that account ({_first_line(e)})"
        ) from None
    except RepositoryNotFoundError:
        raise FileNotFoundError(
            f"Model {repo_id!r} is not a local path and the Hugging Face hub has no such repository (or it is "
            f"private: set HF_TOKEN). Check the id, or pass a local model directory or .gguf file."
        ) from None
    except RevisionNotFoundError:
        raise FileNotFoundError(
            f"Model {repo_id!r} has no revision {revision!r} on the Hugging Face hub: pass an existing branch, "
            "tag or commit with --revision."
        ) from None
    except LocalEntryNotFoundError:
        why = (
            "HF_HUB_OFFLINE=1 forbids downloading it"
            if offline
            else "the Hugging Face hub could not be reached to download it"
        )
        raise FileNotFoundError(
            f"Model {repo_id!r}{at} is not a local path, not in the Hugging Face cache at {cache}, and {why}: "
            f"{fixes}."
        ) from None
    except HfHubHTTPError as e:
        raise FileNotFoundError(
            f"Model {repo_id!r}{at} could not be downloaded from the Hugging Face hub ({_first_line(e)}) and is "
            f"not in the cache at {cache}: {fixes}."
        ) from None
    model_dir = Path(path)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(
            f"Model {repo_id!r}{at} (snapshot {model_dir}) has no config.json: tokenmill loads Hugging Face "
            "model repositories (config.json, *.safetensors, tokenizer.json). For a GGUF-only repository, "
            "download one .gguf file and pass its path."
        )
    logger.info("Model %s%s: %s", repo_id, at, model_dir)
    return model_dir


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
