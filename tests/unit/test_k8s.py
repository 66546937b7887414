"""deploy/k8s agrees with Kubernetes and with the code. Every document of every manifest, and the demo overlay as
kustomize renders it, validates strictly against the Kubernetes schemas (kubernetes-validate carries them: no
cluster, no network). Every service runs with its probes, resources and replicas, as the principal it is; NATS is a
StatefulSet of three whose configuration, with the Secret docs/deploy.md makes from `auth init`, is one nats-server
accepts; the services are given its three pods; no Secret is committed."""

from __future__ import annotations

import copy
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from services.runtime import SERVICES, nats_server_binary
from shared.contracts.catalog import Catalog

ROOT = Path(__file__).parents[2]
K8S = ROOT / "deploy" / "k8s"
DEMO = K8S / "overlays" / "demo"
DEPLOY_DOC = ROOT / "docs" / "deploy.md"
KUBERNETES = "1.30"  # the oldest release still maintained upstream when this was written: what the manifests need
CLUSTER_SCOPED = {"Namespace", "PersistentVolume", "ClusterRole", "ClusterRoleBinding", "StorageClass"}
# what each kind of Continuum service needs at least, and runs as here
REPLICAS = {"intake": 2, "capacity": 2, "routing": 2, "billing": 1, "gateway": 2, "agent": 1}


def _documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _manifests() -> list[Path]:
    return sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml")


def _kustomization(folder: Path) -> dict:
    return yaml.safe_load((folder / "kustomization.yaml").read_text())


def _containers(doc: dict) -> list[dict]:
    template = doc.get("spec", {}).get("template", {}).get("spec", {})
    return template.get("containers", []) + template.get("initContainers", [])


def _render(folder: Path) -> list[dict]:
    """What `kubectl kustomize FOLDER` makes of the transformers these kustomizations use: resources (files and
    folders), labels (on metadata only, as kustomize's `labels` does without includeSelectors), namespace and
    images. A kustomization that uses any other is refused: this would not render it."""
    kustomization = _kustomization(folder)
    known = {"apiVersion", "kind", "resources", "labels", "namespace", "images"}
    assert set(kustomization) <= known, f"{folder}: {set(kustomization) - known} is not rendered here: add it"
    docs: list[dict] = []
    for resource in kustomization["resources"]:
        path = folder / resource
        docs += _render(path) if path.is_dir() else copy.deepcopy(_documents(path))
    for label in kustomization.get("labels", []):
        assert set(label) == {"pairs"}, f"{folder}: labels {label}"
        for doc in docs:
            doc["metadata"].setdefault("labels", {}).update(label["pairs"])
    if namespace := kustomization.get("namespace"):
        for doc in docs:
            if doc["kind"] not in CLUSTER_SCOPED:
                doc["metadata"]["namespace"] = namespace
    for image in kustomization.get("images", []):
        for doc in docs:
            for container in _containers(doc):
                if container["image"].split(":")[0] == image["name"]:
                    container["image"] = f"{image.get('newName', image['name'])}:{image['newTag']}"
    return docs


def _by(docs: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def _env(docs: list[dict], container: dict) -> dict[str, str]:
    """A container's environment: its ConfigMaps' (envFrom) and its own, which win."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env |= _by(docs, "ConfigMap")[source["configMapRef"]["name"]]["data"]
    env |= {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
    return env


@pytest.mark.parametrize("manifest", _manifests(), ids=lambda p: str(p.relative_to(K8S)))
def test_every_document_of_every_manifest_validates_against_the_kubernetes_schemas(manifest):
    for doc in _documents(manifest):
        try:
            kubernetes_validate.validate(doc, KUBERNETES, strict=True)
        except kubernetes_validate.ValidationError as e:
            raise AssertionError(f"{doc['kind']} {doc['metadata']['name']}: {'.'.join(map(str, e.path))}: "
                                 f"{e.message}") from None


def test_the_demo_overlay_renders_to_documents_that_validate():
    docs = _render(DEMO)
    for doc in docs:
        kubernetes_validate.validate(doc, KUBERNETES, strict=True)
    assert {d["metadata"].get("namespace") for d in docs if d["kind"] not in CLUSTER_SCOPED} == {"continuum"}
    assert all(d["metadata"]["labels"]["app.kubernetes.io/part-of"] == "continuum" for d in docs)
    images = {c["image"] for d in docs for c in _containers(d)}
    assert images == {"registry.example.eu/continuum:0.1.0", "nats:2.11-alpine"}, images


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="no kubectl here to render the overlay with")
def test_the_renderer_here_agrees_with_kubectl_kustomize():
    rendered = subprocess.run(["kubectl", "kustomize", str(DEMO)], capture_output=True, text=True, timeout=120,
                              check=True).stdout
    theirs = [d for d in yaml.safe_load_all(rendered) if d]
    key = lambda d: (d["kind"], d["metadata"]["name"])  # noqa: E731
    assert sorted(map(key, theirs)) == sorted(map(key, _render(DEMO)))
    ours = {key(d): d for d in _render(DEMO)}
    for doc in theirs:
        assert doc == ours[key(doc)], f"{key(doc)} renders otherwise here"


def test_every_manifest_is_a_resource_of_the_kustomization_beside_it():
    for kustomization in K8S.rglob("kustomization.yaml"):
        folder = kustomization.parent
        listed = {(folder / r).resolve() for r in _kustomization(folder)["resources"]}
        assert all(p.exists() for p in listed), f"{folder}: a resource that is not there"
        for manifest in folder.glob("*.yaml"):
            if manifest.name != "kustomization.yaml":
                assert manifest.resolve() in listed, f"{manifest} is in no kustomization"
    assert (K8S / "base").resolve() in {(DEMO / r).resolve() for r in _kustomization(DEMO)["resources"]}


def test_every_service_runs_with_probes_resources_and_its_replicas():
    docs = _render(DEMO)
    run: dict[str, list[str]] = {}
    for name, deployment in _by(docs, "Deployment").items():
        (container,) = _containers(deployment)
        args = container["args"]
        assert args[:1] == ["service"] and args[1] in SERVICES, f"{name}: runs {args}"
        service = args[1]
        run.setdefault(service, []).append(args[args.index("--site") + 1] if service == "agent" else name)
        assert deployment["spec"]["replicas"] == REPLICAS[service], f"{name}: {deployment['spec']['replicas']}"
        env = _env(docs, container)
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports["metrics"] == int(env["CONTINUUM_METRICS_PORT"]) == 9464, name
        # alive and ready: /healthz and /readyz beside the metrics, or on the gateway's HTTP port
        probe_port = "http" if service == "gateway" else "metrics"
        if service == "gateway":
            assert ports["http"] == int(env["CONTINUUM_HTTP_PORT"]) == 8080 and env["CONTINUUM_HTTP_HOST"] == "0.0.0.0"
        for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
            assert container[probe]["httpGet"] == {"path": path, "port": probe_port}, f"{name}: {probe}"
        resources = container["resources"]
        for bound in ("requests", "limits"):
            assert set(resources[bound]) == {"cpu", "memory"}, f"{name}: {bound} {resources.get(bound)}"
        assert env["OTEL_SERVICE_NAME"] == f"continuum-{service}", name
        security = deployment["spec"]["template"]["spec"]["securityContext"]
        assert security["runAsNonRoot"] and not container["securityContext"]["allowPrivilegeEscalation"], name
    assert sorted(run) == sorted(SERVICES), "every service runs"
    assert sorted(run["agent"]) == sorted(Catalog.load().sites), "an agent a site of the built-in catalog"
    assert all(len(names) == 1 for service, names in run.items() if service != "agent"), run


def test_each_pod_holds_its_own_principals_seed_and_no_secret_is_committed():
    docs = _render(DEMO)
    assert not [d for path in _manifests() for d in _documents(path) if d["kind"] == "Secret"], "a committed Secret"
    for name, deployment in _by(docs, "Deployment").items():
        (container,) = _containers(deployment)
        env = _env(docs, container)
        volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        auth = volumes[mounts["/auth"]]["projected"]["sources"]
        seeds = [item for source in auth if "secret" in source for item in source["secret"]["items"]]
        creds = Path(env["CONTINUUM_NATS_CREDS"])
        # one seed, the container's own principal's: `services`, or the agent's site
        assert seeds == [{"key": creds.name, "path": f"creds/{creds.name}"}], f"{name}: {seeds}"
        assert creds.parent == Path("/auth/creds") and env["CONTINUUM_NATS_CA"] == "/auth/tls/ca.pem", name
        if container["args"][1] == "agent":
            assert creds.name == f"site-{container['args'][-1]}.nk", name
        else:
            assert creds.name == "services.nk", name


def test_the_services_are_given_the_three_nats_pods_and_keep_every_stream_on_all_three():
    docs = _render(DEMO)
    nats = _by(docs, "StatefulSet")["nats"]
    service = _by(docs, "Service")[nats["spec"]["serviceName"]]
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"], \
        "the pods' names resolve before they are ready: routes form while they start"
    replicas = nats["spec"]["replicas"]
    assert replicas == 3 and nats["spec"]["podManagementPolicy"] == "Parallel"
    pods = [f"{nats['metadata']['name']}-{i}.{service['metadata']['name']}" for i in range(replicas)]
    env = _by(docs, "ConfigMap")["continuum-env"]["data"]
    assert env["CONTINUUM_NATS_URL"].split(",") == [f"tls://{pod}:4222" for pod in pods]
    assert env["CONTINUUM_STREAM_REPLICAS"] == str(replicas)
    conf = _by(docs, "ConfigMap")["nats-config"]["data"]["nats.conf"]
    routes = re.search(r"routes: \[(.*?)\]", conf, re.S)
    assert routes and routes.group(1).split() == [f"nats-route://{pod}:6222" for pod in pods]
    (container,) = _containers(nats)
    store = container["args"][container["args"].index("-sd") + 1]
    claims = {t["metadata"]["name"] for t in nats["spec"]["volumeClaimTemplates"]}
    assert {m["name"] for m in container["volumeMounts"] if m["mountPath"] == store} <= claims, \
        "each server's JetStream store on a volume of its own"
    assert _by(docs, "PodDisruptionBudget")["nats"]["spec"]["maxUnavailable"] == 1, "two keep the quorum"
    assert {"startupProbe", "livenessProbe", "readinessProbe", "resources"} <= set(container)


def _documented(command: str) -> list[str]:
    """The arguments of the first command in docs/deploy.md that starts with `command`."""
    for line in DEPLOY_DOC.read_text().splitlines():
        if line.strip().startswith(command):
            return shlex.split(line.strip())
    raise AssertionError(f"docs/deploy.md gives no `{command}`")


def test_nats_server_accepts_the_pods_configuration_with_the_secret_docs_deploy_makes(tmp_path):
    """The StatefulSet's files, laid out as the pod sees them (its ConfigMap at /etc/nats/nats.conf, the Secret
    continuum-nats at /etc/nats/auth as its items say), from what docs/deploy.md's `auth init --server-dir` and
    `kubectl create secret` make: `nats-server -t` (check the configuration and exit) takes them."""
    from services.auth import init

    nats = _by(_render(DEMO), "StatefulSet")["nats"]
    (container,) = _containers(nats)
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in nats["spec"]["template"]["spec"]["volumes"]}
    root = tmp_path / "pod"  # the pod's file system, under tmp_path
    auth_init = _documented("continuum auth init --out auth --server-dir")
    server_dir = Path(auth_init[auth_init.index("--server-dir") + 1])
    assert server_dir == Path(mounts["auth"]["mountPath"]), "auth init names the files where the Secret is mounted"
    hosts = [auth_init[i + 1] for i, arg in enumerate(auth_init) if arg == "--host"]
    env = _by(_render(DEMO), "ConfigMap")["continuum-env"]["data"]
    assert hosts == [url.split("//")[1].split(":")[0] for url in env["CONTINUUM_NATS_URL"].split(",")]
    out = tmp_path / "auth"
    init(out, Catalog.load(), hosts, server_dir=root / server_dir.relative_to("/"))
    # the Secret, from the files docs/deploy.md names (each file's name its key), mounted as the StatefulSet says
    create = _documented("kubectl -n continuum create secret generic continuum-nats")
    sources = [Path(arg.removeprefix("--from-file=")) for arg in create if arg.startswith("--from-file=")]
    files = {source.name: source for source in sources}
    secret = volumes[mounts["auth"]["name"]]["secret"]
    assert secret["secretName"] == "continuum-nats"
    assert {item["key"] for item in secret["items"]} == set(files), "the Secret's keys are what the pod mounts"
    for item in secret["items"]:
        target = root / server_dir.relative_to("/") / item["path"]
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(out / files[item["key"]].relative_to("auth"), target)
    config = root / mounts["config"]["mountPath"].lstrip("/")
    config.write_text(_by(_render(DEMO), "ConfigMap")["nats-config"]["data"][mounts["config"]["subPath"]])
    checked = subprocess.run([nats_server_binary(), "-c", str(config), "-t"], capture_output=True, text=True,
                             env=dict(os.environ, POD_NAME="nats-0"), timeout=30, check=False)
    assert checked.returncode == 0, checked.stdout + checked.stderr
