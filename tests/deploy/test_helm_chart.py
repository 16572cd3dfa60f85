"""deploy/helm/tokenmill rendered by Helm's own Go SDK (helm-python-sdk), every manifest validated strictly
against the Kubernetes 1.30 schemas, and the objects checked: probes, autoscaling, shutdown, secrets, network
policy, GPU sizing from the planner, the router's config."""

from __future__ import annotations

import copy
import json

import pytest
import yaml

from tests.deploy.tools import CHART, EXAMPLES, RULES

helm = pytest.importorskip("helm_python", reason="helm-python-sdk (the test extra) renders the chart")
kubernetes_validate = pytest.importorskip("kubernetes_validate")

KUBERNETES_VERSION = "1.30.0"
# Custom resources of operators (no schema in kubernetes-validate): checked field by field below.
CUSTOM_API_GROUPS = ("monitoring.coreos.com/", "keda.sh/")
NAMESPACE = "llm"


def load_values(name: str) -> dict:
    return yaml.safe_load((EXAMPLES / name).read_text())


def render(values: dict | None) -> list[dict]:
    with helm.Chart.load(CHART) as chart:
        manifests = chart.render(values, name="tm", namespace=NAMESPACE, is_install=True)
    return [doc for path, text in sorted(manifests.items()) if path.endswith(".yaml")
            for doc in yaml.safe_load_all(text) if doc]


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict], kind: str, name: str) -> dict:
    (doc,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def container(deployment: dict, name: str = "engine") -> dict:
    (c,) = [c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == name]
    return c


def flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


@pytest.fixture(scope="module", params=["cpu-single.yaml", "gpu-8b-tp2.yaml", "multi-tier-router.yaml"])
def example(request) -> tuple[str, dict, list[dict]]:
    values = load_values(request.param)
    return request.param, values, render(values)


def test_every_manifest_validates_strictly(example):
    name, _, docs = example
    assert docs, name
    for doc in docs:
        if doc["apiVersion"].startswith(CUSTOM_API_GROUPS):
            continue
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_strict_validation_rejects_an_unknown_field():
    """The validator is strict: a misspelt field in a rendered Deployment is an error."""
    deployment = copy.deepcopy(by_kind(render(load_values("cpu-single.yaml")), "Deployment")[0])
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError, match="readinesProbe"):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


# Helm's lint severities: 1 info, 2 warning, 3 error.
LINT_WARNING = 2


def test_helm_lint_passes_for_every_example():
    for path in sorted(EXAMPLES.glob("*.yaml")):
        result = helm.lint(CHART, yaml.safe_load(path.read_text()))
        assert result["total_charts_linted"] == 1 and not result["errors"], (path.name, result)
        assert not [m for m in result["messages"] if m["severity"] >= LINT_WARNING], (path.name, result)
    # ... and lint does report a broken values file.
    values = load_values("cpu-single.yaml")
    values["servingEngineSpec"]["modelSpec"][0]["engine"]["maxModelLen"] = "8k"
    result = helm.lint(CHART, values)
    assert any("maxModelLen': got string, want integer" in e for e in result["errors"]), result


def test_engine_probes_ports_and_shutdown(example):
    name, values, docs = example
    spec = values["servingEngineSpec"]
    chart_defaults = yaml.safe_load((CHART / "values.yaml").read_text())["servingEngineSpec"]
    shutdown = spec.get("shutdownTimeoutSeconds", chart_defaults["shutdownTimeoutSeconds"])
    pre_stop = spec.get("preStopSleepSeconds", chart_defaults["preStopSleepSeconds"])
    startup_timeout = spec.get("startupTimeoutSeconds", chart_defaults["startupTimeoutSeconds"])
    engines = [d for d in by_kind(docs, "Deployment")
               if d["metadata"]["labels"]["app.kubernetes.io/component"] == "engine"]
    assert len(engines) == len(spec["modelSpec"]), name
    for deployment in engines:
        pod = deployment["spec"]["template"]["spec"]
        c = container(deployment)
        assert c["ports"] == [{"name": "http", "containerPort": 8000, "protocol": "TCP"}]
        assert flag(c["args"], "--port") == "8000" and flag(c["args"], "--host") == "0.0.0.0"
        assert c["startupProbe"]["httpGet"] == {"path": "/health", "port": "http"}
        assert c["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
        # Liveness must not fail while loading or draining: /live, not /health.
        assert c["livenessProbe"]["httpGet"] == {"path": "/live", "port": "http"}
        startup = c["startupProbe"]
        assert startup["periodSeconds"] * startup["failureThreshold"] >= startup_timeout
        # The grace period covers the preStop sleep plus the engine's drain (--shutdown-timeout).
        assert float(flag(c["args"], "--shutdown-timeout")) == shutdown
        assert c["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", str(pre_stop)]
        assert pod["terminationGracePeriodSeconds"] >= shutdown + pre_stop + 5
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert c["securityContext"]["allowPrivilegeEscalation"] is False
        # The Service selects exactly this tier's pods on the named port.
        service = one(docs, "Service", deployment["metadata"]["name"])
        assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
        assert service["spec"]["ports"][0]["targetPort"] == "http"


def test_api_key_comes_from_the_secret(example):
    name, values, docs = example
    if not values.get("auth", {}).get("enabled"):
        # The planner's values say nothing of keys: without auth no key is set; with it, from the Secret.
        for deployment in by_kind(docs, "Deployment"):
            assert "env" not in deployment["spec"]["template"]["spec"]["containers"][0]
        values = {**values, "auth": {"enabled": True, "existingSecret": "tokenmill-keys"}}
        docs = render(values)
    auth = values["auth"]
    for deployment in by_kind(docs, "Deployment"):
        c = deployment["spec"]["template"]["spec"]["containers"][0]
        env = {e["name"]: e for e in c.get("env", [])}
        key_env = "TOKENMILL_API_KEY" if c["name"] == "engine" else "TOKENMILL_ENGINE_API_KEY"
        assert env[key_env]["valueFrom"] == {
            "secretKeyRef": {"name": auth["existingSecret"], "key": "api-key"}}, (name, c["name"])
        assert "value" not in env[key_env]
    # An existing Secret is referenced, never created (its key is not in the values).
    assert not by_kind(docs, "Secret")


def test_chart_created_secret_and_missing_key_error():
    values = load_values("cpu-single.yaml")
    values["auth"] = {"enabled": True, "apiKey": "sk-local-demo"}
    docs = render(values)
    (secret,) = by_kind(docs, "Secret")
    assert secret["stringData"] == {"api-key": "sk-local-demo"}
    ref = container(by_kind(docs, "Deployment")[0])["env"][0]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": secret["metadata"]["name"], "key": "api-key"}
    values["auth"] = {"enabled": True}
    with pytest.raises(helm.HelmRenderError, match="auth.existingSecret"):
        render(values)


def test_network_policy_admits_only_the_router_and_listed_namespaces(example):
    name, values, docs = example
    (policy,) = by_kind(docs, "NetworkPolicy")
    engine_labels = {"app.kubernetes.io/name": "tokenmill", "app.kubernetes.io/instance": "tm",
                     "app.kubernetes.io/component": "engine"}
    assert policy["spec"]["podSelector"]["matchLabels"] == engine_labels
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    (rule,) = policy["spec"]["ingress"]
    assert rule["ports"] == [{"port": 8000, "protocol": "TCP"}]
    peers = rule["from"]
    namespaces = [p["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
                  for p in peers if "namespaceSelector" in p]
    assert namespaces == values.get("networkPolicy", {}).get("allowedNamespaces", [])
    pod_peers = [p["podSelector"]["matchLabels"] for p in peers if "podSelector" in p]
    # Every engine pod is selected by the policy; no peer selects the engines themselves.
    for deployment in by_kind(docs, "Deployment"):
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        is_engine = labels.get("app.kubernetes.io/component") == "engine"
        assert is_engine == all(labels.get(k) == v for k, v in engine_labels.items())
        admitted = any(all(labels.get(k) == v for k, v in peer.items()) for peer in pod_peers)
        assert admitted == (not is_engine), (name, deployment["metadata"]["name"])
    if values.get("router", {}).get("enabled"):
        assert {"app.kubernetes.io/name": "tokenmill", "app.kubernetes.io/instance": "tm",
                "app.kubernetes.io/component": "router"} in pod_peers
        assert len(pod_peers) == 1  # clientPodLabels: {} -> only the router


def test_gpu_requests_equal_the_planner(tmp_path, capsys):
    """The GPU example is exactly what `tokenmill plan --emit helm-values` prints, and renders to its sizing."""
    from tokenmill.entrypoints.cli import main

    out = tmp_path / "values.yaml"
    assert main(["plan", "Llama-3.1-8B", "--gpu", "L40S", "--context", "8192", "--concurrency", "32",
                 "--emit", "helm-values", "--output", str(out)]) == 0
    planned = yaml.safe_load(out.read_text())
    assert planned == load_values("gpu-8b-tp2.yaml"), "regenerate examples/gpu-8b-tp2.yaml with the planner"
    tier = planned["servingEngineSpec"]["modelSpec"][0]
    assert tier["engine"]["tensorParallelSize"] == tier["gpu"]["count"] == 2

    (deployment,) = by_kind(render(planned), "Deployment")
    c = container(deployment)
    resources = c["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"] == 2
    assert resources["requests"]["memory"] == tier["resources"]["requests"]["memory"]
    assert flag(c["args"], "--tensor-parallel-size") == "2"
    assert flag(c["args"], "--max-model-len") == "8192"
    assert flag(c["args"], "--max-num-seqs") == "32"
    assert flag(c["args"], "--gpu-memory-utilization") == "0.9"
    assert c["image"].endswith("-cuda")
    # Tensor-parallel workers get a memory-backed /dev/shm.
    pod = deployment["spec"]["template"]["spec"]
    shm = [v for v in pod["volumes"] if v["name"] == "shm"][0]
    assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": "8Gi"}
    assert {"name": "shm", "mountPath": "/dev/shm"} in c["volumeMounts"]
    assert deployment["spec"]["template"]["metadata"]["labels"]["tokenmill.io/gpu-type"] == "L40S"


def test_tensor_parallel_size_must_match_the_gpus():
    values = load_values("gpu-8b-tp2.yaml")
    values["servingEngineSpec"]["modelSpec"][0]["gpu"]["count"] = 1
    with pytest.raises(helm.HelmRenderError, match="tensorParallelSize=2 needs gpu.count=2"):
        render(values)


def test_autoscaling_hpa_and_keda():
    values = load_values("multi-tier-router.yaml")
    docs = render(values)
    (hpa,) = by_kind(docs, "HorizontalPodAutoscaler")
    assert hpa["metadata"]["name"] == "tm-tokenmill-large"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": "tm-tokenmill-large"}
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    assert metric["pods"]["metric"]["name"] == "vllm_num_requests_waiting"
    assert metric["pods"]["target"] == {"type": "AverageValue", "averageValue": "5"}
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (1, 4)
    # The autoscaled Deployment leaves its replica count to the HPA.
    assert "replicas" not in one(docs, "Deployment", "tm-tokenmill-large")["spec"]
    (scaled,) = by_kind(docs, "ScaledObject")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    assert scaled["spec"]["scaleTargetRef"] == {"name": "tm-tokenmill-small"}
    assert scaled["spec"]["maxReplicaCount"] == 8
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "prometheus"
    assert trigger["metadata"]["query"] == \
        'sum(vllm:num_requests_waiting{namespace="llm",service="tm-tokenmill-small"})'
    assert trigger["metadata"]["threshold"] == "5"


def test_monitoring_objects():
    docs = render(load_values("multi-tier-router.yaml"))
    (monitor,) = by_kind(docs, "ServiceMonitor")
    assert monitor["spec"]["endpoints"] == [{"port": "http", "path": "/metrics", "interval": "15s"}]
    selector = monitor["spec"]["selector"]["matchLabels"]
    services = by_kind(docs, "Service")
    assert len(services) == 3 and all(
        all(s["metadata"]["labels"].get(k) == v for k, v in selector.items()) for s in services)
    assert all(s["spec"]["ports"][0]["name"] == "http" for s in services)
    (rule,) = by_kind(docs, "PrometheusRule")
    # The PrometheusRule carries the plain rules file, unchanged.
    assert rule["spec"] == yaml.safe_load(RULES.read_text())
    assert (CHART / "files" / "tokenmill-rules.yaml").read_text() == RULES.read_text()
    (pdb_small, pdb_large) = sorted(by_kind(docs, "PodDisruptionBudget"), key=lambda d: d["metadata"]["name"])
    assert pdb_small["spec"]["maxUnavailable"] == 1


def test_router_deployment_and_config():
    values = load_values("multi-tier-router.yaml")
    docs = render(values)
    router = one(docs, "Deployment", "tm-tokenmill-router")
    c = container(router, "router")
    assert c["command"] == ["tokenmill", "route"]
    assert flag(c["args"], "--config") == "/etc/tokenmill/router/router.yaml"
    assert c["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    env = {e["name"]: e for e in c["env"]}
    assert env["CLOUD_KEY"]["valueFrom"] == {"secretKeyRef": {"name": "cloud-api", "key": "key"}}
    config = yaml.safe_load(one(docs, "ConfigMap", "tm-tokenmill-router")["data"]["router.yaml"])
    assert config["backends"]["small"] == {
        "urls": ["http://tm-tokenmill-small.llm.svc:8000/v1"], "model": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "api_key_env": "TOKENMILL_ENGINE_API_KEY", "price": {"gpu_hourly": 0.2}}
    assert config["backends"]["large"]["urls"] == ["http://tm-tokenmill-large.llm.svc:8000/v1"]
    assert config["backends"]["cloud-mid"] == values["router"]["extraBackends"]["cloud-mid"]
    assert config["routes"] == values["router"]["config"]["routes"]
    assert config["balancing"] == "prefix"
    # The router's Service fronts it; the config checksum rolls the pods when the config changes.
    assert one(docs, "Service", "tm-tokenmill-router")["spec"]["ports"][0]["port"] == 8080
    changed = copy.deepcopy(values)
    changed["router"]["config"]["balancing"] = "round_robin"
    other = one(render(changed), "Deployment", "tm-tokenmill-router")
    annotations = "checksum/config"
    assert other["spec"]["template"]["metadata"]["annotations"][annotations] != \
        router["spec"]["template"]["metadata"]["annotations"][annotations]


def test_router_config_is_accepted_by_the_router(monkeypatch):
    """The rendered ConfigMap parses with `tokenmill route`'s own config loader (where the router exists)."""
    router_config = pytest.importorskip("tokenmill.router.config", reason="tokenmill route is not in this tree")
    docs = render(load_values("multi-tier-router.yaml"))
    text = one(docs, "ConfigMap", "tm-tokenmill-router")["data"]["router.yaml"]
    monkeypatch.setenv("TOKENMILL_ENGINE_API_KEY", "sk-engine")
    monkeypatch.setenv("CLOUD_KEY", "sk-cloud")
    config = router_config.parse_config(yaml.safe_load(text), "router.yaml")
    assert {b for b in config.backends} == {"small", "large", "cloud-mid"}


def test_model_sources():
    values = load_values("cpu-single.yaml")
    tier = values["servingEngineSpec"]["modelSpec"][0]
    tier["model"] = {"source": "gguf", "path": "qwen/qwen2.5-0.5b-q4_k_m.gguf",
                     "volume": {"claimName": "shared-models", "mountPath": "/models"}}
    docs = render(values)
    (deployment,) = by_kind(docs, "Deployment")
    c = container(deployment)
    assert c["args"][0] == "/models/qwen/qwen2.5-0.5b-q4_k_m.gguf"
    assert {"name": "models", "mountPath": "/models", "readOnly": True} in c["volumeMounts"]
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    assert volumes["models"]["persistentVolumeClaim"] == {"claimName": "shared-models"}
    assert not by_kind(docs, "PersistentVolumeClaim")  # an existing claim is used, not created
    for doc in docs:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    # The bundled model: no model argument, no volume.
    (bundled,) = by_kind(render(load_values("cpu-single.yaml")), "Deployment")
    assert container(bundled)["args"][0] == "--host"


BAD_VALUES = [
    ({"servingEngineSpec": {"modelSpec": [{"name": "Big_Tier", "servedModelName": "m",
                                           "model": {"source": "bundled"}}]}},
     "'Big_Tier' does not match pattern"),
    ({"servingEngineSpec": {"modelSpec": [{"name": "t", "servedModelName": "m", "model": {"source": "bundled"},
                                           "engine": {"gpuMemoryUtilization": 1.5}}]}},
     "gpuMemoryUtilization"),
    ({"servingEngineSpec": {"modelSpec": [{"name": "t", "servedModelName": "m", "model": {"source": "pvc"}}]}},
     "missing property 'path'"),
    ({"servingEngineSpec": {"modelSpec": [{"name": "t", "servedModelName": "m", "model": {"source": "s3"}}]}},
     "source"),
    ({"servingEngineSpec": {"modelSpec": [{"name": "t", "servedModelName": "m", "model": {"source": "bundled"},
                                           "engine": {"maxModelLen": "8k"}}]}},
     "maxModelLen"),
    ({"servingEngineSpec": {"modelSpec": [{"name": "t", "servedModelName": "m", "model": {"source": "bundled"},
                                           "engine": {"max_model_len": 4096}}]}},
     "max_model_len"),
    ({"autoscaling": {"kind": "vpa"}}, "kind"),
]


@pytest.mark.parametrize(("values", "message"), BAD_VALUES)
def test_bad_values_fail_the_schema_with_a_message(values, message):
    with helm.Chart.load(CHART) as chart:
        with pytest.raises(helm.HelmValuesError, match=message) as info:
            chart.validate_schema(values)
        # Rendering (what `helm install` does) refuses them too.
        with pytest.raises(helm.HelmError):
            chart.render(values, name="tm", namespace=NAMESPACE)
    assert "/servingEngineSpec" in str(info.value) or "/autoscaling" in str(info.value)


def test_schema_accepts_the_defaults_and_examples():
    with helm.Chart.load(CHART) as chart:
        chart.validate_schema(None)
        for path in sorted(EXAMPLES.glob("*.yaml")):
            chart.validate_schema(yaml.safe_load(path.read_text()))
    json.loads((CHART / "values.schema.json").read_text())


def test_quantization_is_refused_with_the_fix():
    values = load_values("cpu-single.yaml")
    values["servingEngineSpec"]["modelSpec"][0]["engine"]["quantization"] = "awq"
    with pytest.raises(helm.HelmRenderError, match="reads the quantization .* from the checkpoint"):
        render(values)


def test_default_values_render_and_validate():
    docs = render(None)
    assert {d["kind"] for d in docs} == {"Deployment", "Service", "PodDisruptionBudget", "NetworkPolicy"}
    for doc in docs:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
