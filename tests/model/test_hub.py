"""Hugging Face hub ids as the model, offline: a cache in huggingface_hub's layout built here with tiny models.

Nothing reaches the network: every test runs with HF_HUB_OFFLINE=1.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.tiny_models import build_tiny_model
from tokenmill import LLM, SamplingParams
from tokenmill.model.default_model import prepare_model

REPO = "tiny-org/tiny-model"
MAIN = "1" * 40  # commit of refs/main: a llama
V2 = "2" * 40  # commit of refs/v2: a qwen2


def _add_snapshot(cache: Path, repo: str, commit: str, model_dir: Path, refs: tuple[str, ...]) -> Path:
    """repo at commit, as huggingface_hub lays out its cache: models--org--name/snapshots/<commit>/ and
    refs/<branch> holding the commit (real caches link snapshot files to blobs/; readers follow either)."""
    repo_dir = cache / f"models--{repo.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / commit
    shutil.copytree(model_dir, snapshot)
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    for ref in refs:
        (repo_dir / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory, server_model_dir, tiny_tokenizer_dir) -> Path:
    cache = tmp_path_factory.mktemp("hf") / "hub"
    qwen2 = build_tiny_model("qwen2", tmp_path_factory.mktemp("qwen2") / "qwen2", tiny_tokenizer_dir)
    _add_snapshot(cache, REPO, MAIN, server_model_dir, ("main",))
    _add_snapshot(cache, REPO, V2, qwen2, ("v2",))
    return cache


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """HF_HUB_OFFLINE=1, and HF_HOME / HF_HUB_CACHE pointing at an empty directory unless a test sets them."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("TOKENMILL_CACHE_DIR", str(tmp_path / "tokenmill-cache"))
    return monkeypatch


def test_llm_loads_a_hub_id_from_the_cache(offline, hub_cache):
    offline.setenv("HF_HUB_CACHE", str(hub_cache))
    llm = LLM(REPO, dtype="float32", kv_cache_memory="16MiB", show_progress=False)
    assert llm.llm_engine.model_dir == hub_cache / f"models--{REPO.replace('/', '--')}" / "snapshots" / MAIN
    assert llm.llm_engine.core.spec.model_type == "llama"
    out = llm.generate(["Hello"], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4


def test_llm_revision_and_download_dir(offline, hub_cache):
    """revision= picks the other snapshot (a branch here); download_dir= is the cache (HF_HUB_CACHE unset)."""
    llm = LLM(REPO, revision="v2", download_dir=str(hub_cache), dtype="float32", kv_cache_memory="16MiB",
              show_progress=False)
    assert llm.llm_engine.model_dir.name == V2
    assert llm.llm_engine.core.spec.model_type == "qwen2"


def test_prepare_model_revisions(offline, hub_cache):
    offline.setenv("HF_HOME", str(hub_cache.parent))  # HF_HOME/hub is the cache
    assert prepare_model(REPO).name == MAIN
    assert prepare_model(REPO, revision="main").name == MAIN
    assert prepare_model(REPO, revision=V2).name == V2  # a commit
    with pytest.raises(FileNotFoundError, match="at revision 'v3'"):
        prepare_model(REPO, revision="v3")


def test_missing_hub_id_says_where_it_looked_and_how_to_fix(offline, hub_cache):
    with pytest.raises(FileNotFoundError) as info:
        LLM("tiny-org/missing-model", download_dir=str(hub_cache), show_progress=False)
    message = str(info.value)
    assert "'tiny-org/missing-model'" in message
    assert f"not in the Hugging Face cache at {hub_cache}" in message
    assert "HF_HUB_OFFLINE=1 forbids downloading it" in message
    assert "hf download tiny-org/missing-model" in message and "HF_HUB_OFFLINE=0" in message
    assert "pass a local model directory" in message


def test_local_path_takes_priority_over_a_hub_id(offline, hub_cache, tmp_path, server_model_dir):
    offline.setenv("HF_HUB_CACHE", str(hub_cache))
    local = tmp_path / REPO
    shutil.copytree(server_model_dir, local)
    offline.chdir(tmp_path)
    assert prepare_model(REPO) == Path(REPO)
    assert prepare_model(REPO).resolve() == local.resolve()


@pytest.mark.slow
def test_serve_a_hub_id(offline, hub_cache, tmp_path):
    """`tokenmill serve <id> --download-dir CACHE --revision v2` loads that snapshot and serves it under the id."""
    import openai

    from tests.entrypoints.openai.conftest import ServerProcess

    server = ServerProcess([REPO, "--download-dir", str(hub_cache), "--revision", "v2", "--dtype", "float32",
                            "--kv-cache-memory", "16MiB"], tmp_path / "server.log")
    try:
        server.wait_ready()
        client = openai.OpenAI(base_url=server.base_url, api_key="unused")
        assert [m.id for m in client.models.list().data] == [REPO]
        assert client.models.retrieve(REPO).id == REPO  # an id with "/" in the path
        completion = client.completions.create(model=REPO, prompt="Hello", max_tokens=3)
        assert completion.model == REPO
        assert f"snapshots/{V2}" in server.log()  # the v2 snapshot was loaded
    finally:
        server.stop()
