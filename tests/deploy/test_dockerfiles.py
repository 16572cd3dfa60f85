"""The Dockerfiles, parsed (no Docker daemon here): non-root user, port 8000, `tokenmill serve` entrypoint,
and the install script that the README and CI use."""

from __future__ import annotations

import fnmatch
import io
import json

import pytest

from tests.deploy.tools import DEPLOY, ROOT

dockerfile_parse = pytest.importorskip("dockerfile_parse", reason="dockerfile-parse (the test extra)")

DOCKERFILES = ["Dockerfile.cpu", "Dockerfile.cuda"]


def parse(name: str):
    text = (DEPLOY / "docker" / name).read_bytes()
    parser = dockerfile_parse.DockerfileParser(fileobj=io.BytesIO(text))
    return parser, parser.structure


def instructions(structure, kind: str) -> list[str]:
    return [i["value"] for i in structure if i["instruction"] == kind]


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_user_port_entrypoint(name):
    parser, structure = parse(name)
    assert parser.baseimage, name
    # Runs as the non-root user created in the image.
    users = instructions(structure, "USER")
    assert users and users[-1] not in ("root", "0", "0:0")
    final_user = users[-1].split(":")[0]
    assert any("useradd --uid 1000" in run and final_user in run for run in instructions(structure, "RUN"))
    # Nothing after the final USER switches back to root.
    last_user_index = max(i for i, x in enumerate(structure) if x["instruction"] == "USER")
    assert all(x["instruction"] != "USER" for x in structure[last_user_index + 1:])
    assert instructions(structure, "EXPOSE") == ["8000"]
    (entrypoint,) = instructions(structure, "ENTRYPOINT")
    assert json.loads(entrypoint) == ["tokenmill", "serve"]  # exec form: flags come as arguments
    (cmd,) = instructions(structure, "CMD")
    assert json.loads(cmd) == ["--host", "0.0.0.0", "--port", "8000"]
    (healthcheck,) = instructions(structure, "HEALTHCHECK")
    assert "/health" in healthcheck


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_installs_with_the_shared_script(name):
    _, structure = parse(name)
    runs = instructions(structure, "RUN")
    installs = [r for r in runs if "scripts/install.sh" in r]
    assert len(installs) == 1 and "pip install" not in installs[0], installs
    assert not [r for r in runs if "pip install" in r], "install steps belong in scripts/install.sh"
    # The bundled model is converted at build time, not at every start.
    assert "prepare_model(None)" in installs[0]
    # Every COPY source exists and is not excluded by .dockerignore.
    ignored = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines() if p.strip()]
    for copy in instructions(structure, "COPY"):
        *sources, _ = copy.split()
        for source in sources:
            assert (ROOT / source).exists(), source
            assert not any(fnmatch.fnmatch(source.rstrip("/"), p) for p in ignored), source
    if name == "Dockerfile.cuda":
        assert "--keep-torch" in installs[0] and "gpu" in installs[0]
    else:
        assert "TORCH_INDEX_URL" in installs[0]


def test_readme_and_ci_use_the_install_script():
    readme = (ROOT / "README.md").read_text()
    commands = [line.strip() for line in readme.splitlines() if line.startswith("    bash scripts/install.sh")]
    serve, test = commands[:2]  # the README's two set-up commands come first
    assert serve.startswith("bash scripts/install.sh && tokenmill serve")
    assert test.startswith("bash scripts/install.sh --test && ruff check . && ")
    assert "python -m pytest" in test
    # CI runs exactly the README's test command.
    assert test in (ROOT / ".ci" / "run").read_text().splitlines()
