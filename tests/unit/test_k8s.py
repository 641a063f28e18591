"""deploy/k8s renders and validates offline (no cluster here):

- every overlay renders with the pinned kustomize (`make tools` builds it);
- Kubernetes kinds validate strictly against kubernetes-validate's bundled schemas;
- KEDA objects validate against the openAPIV3Schema of KEDA's own CRDs (`make tools` fetches
  them from the kedacore/keda Go module);
- every container runs an existing `llmstream` command with flags it knows, and every
  LLMSTREAM_* variable set is a real setting;
- KEDA never asks for more workers than prompts partitions.
"""

from __future__ import annotations

import base64
import contextlib
import io
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from llmstream import config
from llmstream_tools import cli

REPO = Path(__file__).resolve().parents[2]
OVERLAYS = sorted(p.name for p in (REPO / "deploy" / "k8s" / "overlays").iterdir())
K8S_VERSION = "1.33.0"
KEDA_CRDS = config.cache_dir() / "keda-v2.21.0" / "crd"


def kustomize() -> str:
    found = shutil.which("kustomize") or str(config.cache_dir() / "bin" / "kustomize")
    if not os.access(found, os.X_OK):
        pytest.fail("kustomize not found: run `make tools` (deploy/local/tools.sh)")
    return found


def render(overlay: str) -> list[dict[str, Any]]:
    out = subprocess.run(
        [kustomize(), "build", str(REPO / "deploy" / "k8s" / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def keda_schema(kind: str) -> dict[str, Any]:
    files = {
        "ScaledObject": "keda.sh_scaledobjects.yaml",
        "ScaledJob": "keda.sh_scaledjobs.yaml",
        "TriggerAuthentication": "keda.sh_triggerauthentications.yaml",
    }
    path = KEDA_CRDS / files[kind]
    if not path.exists():
        pytest.fail(f"{path} missing: run `make tools` (deploy/local/tools.sh)")
    crd = yaml.safe_load(path.read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1"]
    schema: dict[str, Any] = version["schema"]["openAPIV3Schema"]
    return schema


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_validates(overlay: str) -> None:
    docs = render(overlay)
    assert docs
    for doc in docs:
        name = f"{doc['kind']}/{doc['metadata']['name']}"
        if doc["apiVersion"].startswith("keda.sh/"):
            jsonschema.validate(doc, keda_schema(doc["kind"]))
        else:
            try:
                kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{overlay}: {name}: {exc.message} at {list(exc.path)}")


def containers(docs: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    out: list[tuple[str, dict[str, Any]]] = []
    for doc in docs:
        spec = doc.get("spec", {}).get("template", {}).get("spec", {})
        out.extend((doc["metadata"]["name"], c) for c in spec.get("containers", []))
    return out


# Secrets mounted as files, not read as variables (envFrom).
FILE_SECRETS = ("llmstream-session",)


def _file_secret(doc: dict[str, Any]) -> bool:
    return doc["kind"] == "Secret" and doc["metadata"]["name"].rsplit("-", 1)[0] in FILE_SECRETS


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_commands_flags_and_variables_exist(overlay: str) -> None:
    docs = render(overlay)
    known = {s.env for s in config.SETTINGS}
    for doc in docs:
        if doc["kind"] in ("ConfigMap", "Secret") and not _file_secret(doc):
            data = doc.get("data", {})
            assert set(data) <= known, f"{doc['metadata']['name']}: {set(data) - known}"
    for owner, container in containers(docs):
        args = container["args"]
        assert args[0] in cli.DELEGATED, f"{owner}: no `llmstream {args[0]}`"
        for env in container.get("env", []):
            assert env["name"] in known, f"{owner}: {env['name']} is not a setting"
        help_text = io.StringIO()
        prefix = [args[1]] if args[0] == "infra" else []
        with contextlib.redirect_stdout(help_text), pytest.raises(SystemExit):
            cli.main([args[0], *prefix, "--help"])
        for arg in args[1:]:
            if arg.startswith("--"):
                assert arg in help_text.getvalue(), f"{owner}: `llmstream {args[0]}` has no {arg}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_keda_worker_replicas_never_exceed_partitions(overlay: str) -> None:
    docs = render(overlay)
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap"]
    partitions = int(cm["data"]["LLMSTREAM_PROMPTS_PARTITIONS"])
    (worker,) = [
        d for d in docs if d["kind"] == "ScaledObject" and "worker" in d["metadata"]["name"]
    ]
    assert worker["spec"]["maxReplicaCount"] <= partitions
    (trigger,) = worker["spec"]["triggers"]
    assert trigger["metadata"]["topic"] == cm["data"]["LLMSTREAM_TOPIC_PROMPTS"]
    assert trigger["metadata"]["bootstrapServers"] == cm["data"]["LLMSTREAM_KAFKA_BOOTSTRAP"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gateway_partition_split_is_sized_for_the_hpa_maximum(overlay: str) -> None:
    docs = render(overlay)
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap"]
    (gateway,) = [d for d in docs if d["kind"] == "StatefulSet"]
    (hpa,) = [d for d in docs if d["kind"] == "HorizontalPodAutoscaler"]
    assert hpa["spec"]["scaleTargetRef"]["name"] == gateway["metadata"]["name"]
    slots = int(cm["data"]["LLMSTREAM_GATEWAY_REPLICAS"])
    assert slots == hpa["spec"]["maxReplicas"]
    assert hpa["spec"]["minReplicas"] <= gateway["spec"]["replicas"] <= slots
    assert slots <= int(cm["data"]["LLMSTREAM_TOKENS_PARTITIONS"])


def test_gpu_overlay_requests_a_gpu_for_vllm() -> None:
    docs = render("gpu")
    ((_, model_server),) = [(o, c) for o, c in containers(docs) if o == "llmstream-model-server"]
    assert "vllm" in model_server["args"]
    assert model_server["resources"]["limits"]["nvidia.com/gpu"] == "1"


# ---- credentials: a Secret per principal (docs/security.md) ------------------------------------

PRINCIPALS = {
    "llmstream-gateway": "gateway",
    "llmstream-worker": "worker",
    "llmstream-aggregator": "aggregator",
    "llmstream-init": "admin",
}


def secret_refs(container: dict[str, Any]) -> list[str]:
    return [e["secretRef"]["name"] for e in container.get("envFrom", []) if "secretRef" in e]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_pod_gets_only_its_own_credentials(overlay: str) -> None:
    docs = render(overlay)
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap"]
    assert cm["data"]["LLMSTREAM_KAFKA_SECURITY_PROTOCOL"].startswith("SASL_")
    refs = {owner: secret_refs(c) for owner, c in containers(docs)}
    assert refs.pop("llmstream-model-server") == []
    # Generated Secrets carry a hash suffix (`llmstream-worker-25tk6bdmdb`).
    assert {
        o: [r.rsplit("-", 1)[0] if overlay == "dev" else r for r in v] for o, v in refs.items()
    } == {o: [o] for o in PRINCIPALS}
    ((_, init),) = [(o, c) for o, c in containers(docs) if o == "llmstream-init"]
    assert init["args"] == ["infra", "init", "--acls"]
    (worker,) = [
        d for d in docs if d["kind"] == "ScaledObject" and "worker" in d["metadata"]["name"]
    ]
    (trigger,) = worker["spec"]["triggers"]
    assert trigger["metadata"]["sasl"] == "scram_sha512"
    (auth,) = [d for d in docs if d["kind"] == "TriggerAuthentication"]
    assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]
    assert {r["parameter"]: (r["name"], r["key"]) for r in auth["spec"]["secretTargetRef"]} == {
        "username": (refs["llmstream-worker"][0], "LLMSTREAM_KAFKA_USERNAME"),
        "password": (refs["llmstream-worker"][0], "LLMSTREAM_KAFKA_PASSWORD"),
    }


def test_dev_secrets_name_each_principal_and_its_redis_user() -> None:
    secrets = {
        d["metadata"]["name"].rsplit("-", 1)[0]: {
            k: base64.b64decode(v).decode() for k, v in d["data"].items()
        }
        for d in render("dev")
        if d["kind"] == "Secret" and not _file_secret(d)
    }
    assert {n: s["LLMSTREAM_KAFKA_USERNAME"] for n, s in secrets.items()} == PRINCIPALS
    assert len({s["LLMSTREAM_KAFKA_PASSWORD"] for s in secrets.values()}) == len(PRINCIPALS)
    redis_users = {
        n: s["LLMSTREAM_REDIS_URL"].split("//")[1].split(":")[0]
        for n, s in secrets.items()
        if "LLMSTREAM_REDIS_URL" in s
    }
    assert redis_users == {"llmstream-gateway": "gateway", "llmstream-aggregator": "aggregator"}


def test_every_gateway_replica_reads_one_session_secret_file() -> None:
    """Sessions made on one replica verify on the others: the same Secret, mounted where
    LLMSTREAM_SESSION_SECRET_FILE points, in every gateway pod."""
    docs = render("dev")
    (gateway,) = [
        d
        for d in docs
        if d["metadata"]["name"] == "llmstream-gateway" and d["kind"] == "StatefulSet"
    ]
    pod = gateway["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    path = {e["name"]: e.get("value") for e in container["env"]}["LLMSTREAM_SESSION_SECRET_FILE"]
    (mount,) = [m for m in container["volumeMounts"] if path.startswith(m["mountPath"] + "/")]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    secret_name = volume["secret"]["secretName"]
    (secret,) = [d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"] == secret_name]
    key = path.rsplit("/", 1)[1]
    assert len(base64.b64decode(secret["data"][key])) >= 32
