"""Render the Helm chart offline and check what no cluster is needed to check.

Three layers, each of which fails on its own kind of mistake:

- ``validate``: every object against a schema. Kubernetes kinds use
  kubernetes-validate's strict schemas of the Kubernetes version under test
  (unknown fields fail). Custom resources (KEDA, prometheus-operator, KServe)
  use the CRD schemas pinned in ``deploy/schemas/``, made strict the way
  ``kubectl apply``'s server-side field validation is: an object schema that
  lists its properties rejects others unless it says
  ``x-kubernetes-preserve-unknown-fields``. A kind with no schema is an error,
  never a pass (kubernetes-validate's command line exits 0 for those).
- ``consistency_errors``: references between objects that no schema sees
  (selectors, scale targets, metric names, volumes, ports, drain timing).
- ``render``: ``helm template`` with an explicit Kubernetes version and API list.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import json
import re
import shlex
import subprocess
from pathlib import Path

import jsonschema
import kubernetes_validate
import yaml
from referencing import Registry, Resource

from sd_triton.export.pipeline_models import ADMISSION_DEFAULTS
from sd_triton.server.watchdog import PROBE_COMMAND

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "deploy" / "helm" / "sd-triton"
SCHEMAS = ROOT / "deploy" / "schemas"
ADAPTER_VALUES = ROOT / "deploy" / "prometheus-adapter" / "values.yaml"
KSCHEMA_ROOT = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"
K8S_DEFS = "https://kubernetes.io/api/_definitions.json"
PIPELINE_MODEL = "stable_diffusion"
QUEUE_METRIC = "nv_inference_pending_request_count"
READY, LIVE = "/v2/health/ready", "/v2/health/live"


def ensure_helm(dest: Path) -> Path:
    """The helm binary, installed by deploy/fetch_helm.py (the Makefile's `helm` step) if missing."""
    spec = importlib.util.spec_from_file_location("fetch_helm", ROOT / "deploy" / "fetch_helm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ensure_helm(dest)


def render(
    helm: Path, values: dict | None, *, kube_version: str, api_versions: tuple[str, ...] = ()
) -> list[dict]:
    """``helm template`` of the chart with ``values`` (a values file's content); raises on failure."""
    cmd = [
        str(helm),
        "template",
        "sd",
        str(CHART),
        "--namespace",
        "gen",
        "--kube-version",
        kube_version,
    ]
    for api in api_versions:
        cmd += ["--api-versions", api]
    cmd += ["--values", "-"]
    proc = subprocess.run(cmd, input=yaml.safe_dump(values or {}), capture_output=True, text=True)
    if proc.returncode != 0:
        raise RenderError(proc.stderr.strip())
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


class RenderError(RuntimeError):
    """helm refused the values (schema, a template `fail`) or the chart."""


# --------------------------------------------------------------------------- schemas


def _strict(schema):
    """A copy of a CRD schema in which listed properties are the only ones allowed."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@functools.cache
def crd_schemas() -> dict[tuple[str, str], dict]:
    """(apiVersion, kind) -> strict schema, for every pinned CRD schema in deploy/schemas."""
    out = {}
    for path in sorted(SCHEMAS.glob("*.json")):
        schema = json.loads(path.read_text())
        crd = schema["x-sd-triton-crd"]
        out[(f"{crd['group']}/{crd['version']}", crd["kind"])] = _strict(schema)
    return out


@functools.cache
def _k8s_registry(kube_version: str) -> Registry:
    defs = json.loads(
        (KSCHEMA_ROOT / f"v{kube_version}-local-strict" / "_definitions.json").read_text()
    )
    return Resource.from_contents(defs) @ Registry()


OBJECT_META = {"$ref": f"{K8S_DEFS}#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"}


def validate(doc: dict, kube_version: str) -> str:
    """Validate one object; returns which schema did it. Raises jsonschema.ValidationError."""
    key = (doc.get("apiVersion"), doc.get("kind"))
    schema = crd_schemas().get(key)
    if schema is None:
        kubernetes_validate.validate(doc, kube_version, strict=True)
        return f"kubernetes {kube_version}"
    registry = _k8s_registry(kube_version)
    jsonschema.Draft202012Validator(schema, registry=registry).validate(doc)
    jsonschema.Draft202012Validator(OBJECT_META, registry=registry).validate(doc["metadata"])
    return f"{SCHEMAS.name}/{key[1]}"


# --------------------------------------------------------------------------- consistency


def by_kind(docs: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for d in docs:
        out.setdefault(d["kind"], []).append(d)
    return out


def _matches(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def selector_labels(pairs: str) -> dict[str, str]:
    """PromQL label matchers ``a="x",b=~"y"`` -> {a: x} for the ``=`` ones."""
    return dict(re.findall(r'(\w+)="([^"]*)"', pairs))


def promql_selectors(query: str) -> list[tuple[str, dict[str, str]]]:
    """(metric, equality matchers) of every ``metric{...}`` in a PromQL expression."""
    return [
        (m, selector_labels(body))
        for m, body in re.findall(r"(<<\.Series>>|[a-zA-Z_:][\w:]*)\{([^}]*)\}", query)
    ]


def _queue_errors(where: str, query: str) -> list[str]:
    sels = [
        (m, labels) for m, labels in promql_selectors(query) if m in (QUEUE_METRIC, "<<.Series>>")
    ]
    if not sels:
        return [f"{where}: query {query!r} does not read {QUEUE_METRIC}"]
    return [
        f"{where}: query {query!r} reads model={labels.get('model')!r}, not the pipeline's {PIPELINE_MODEL!r}"
        for _, labels in sels
        if labels.get("model") != PIPELINE_MODEL
    ]


def adapter_rule(metric_name: str) -> dict | None:
    """The prometheus-adapter rule (deploy/prometheus-adapter/values.yaml) that serves ``metric_name``."""
    rules = yaml.safe_load(ADAPTER_VALUES.read_text())["rules"]["custom"]
    return next((r for r in rules if r["name"]["as"] == metric_name), None)


def _pod_errors(deploy: dict) -> list[str]:
    errors = []
    spec = deploy["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    (c,) = [c for c in spec["containers"] if c["name"] == "triton"]
    mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
    for name in mounts.values():
        if name not in volumes:
            errors.append(f"container mounts volume {name!r}, which the pod does not have")
    for name in volumes:
        if name not in mounts.values():
            errors.append(f"volume {name!r} is mounted by no container")

    def mounted_secret(path: str) -> str | None:
        """The Secret a file path reads from, or None if no secret volume is mounted above it."""
        for mount_path, name in mounts.items():
            if path.startswith(mount_path.rstrip("/") + "/") and "secret" in volumes.get(name, {}):
                secret = volumes[name]["secret"]
                rel = path[len(mount_path.rstrip("/")) + 1 :]
                items = [i["path"] for i in secret.get("items", [])]
                if items and rel not in items:
                    return None
                return secret["secretName"]
        return None

    args = c.get("args", [])
    env = {e["name"]: e for e in c.get("env", [])}
    file_refs = [
        (f"env {n}", e["value"])
        for n, e in env.items()
        if str(e.get("value", "")).startswith("/var/run/secrets/")
    ]
    file_refs += [
        (f"arg {a.split('=')[0]}", a.split("=", 1)[1]) for a in args if "=/var/run/secrets/" in a
    ]
    for what, path in file_refs:
        if mounted_secret(path) is None:
            errors.append(f"{what} reads {path}, which no mounted Secret provides")
    errors += _port_errors(c, args)
    return errors


def _port_errors(c: dict, args: list[str]) -> list[str]:
    errors = []
    ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
    flags = {a.split("=")[0]: a.split("=", 1)[1] for a in args if "=" in a}
    for name, flag in (
        ("http", "--http-port"),
        ("grpc", "--grpc-port"),
        ("metrics", "--metrics-port"),
    ):
        if str(ports.get(name)) != flags.get(flag):
            errors.append(
                f"container port {name}={ports.get(name)} but tritonserver {flag}={flags.get(flag)}"
            )
    http = ports.get("http")
    start = c.get("startupProbe", {}).get("httpGet", {})
    if (start.get("port"), start.get("path")) not in (("http", READY), (http, READY)):
        errors.append(f"startupProbe checks {start}, expected GET {READY} on the HTTP port")
    for probe, path in (("readinessProbe", READY), ("livenessProbe", LIVE)):
        command = c.get(probe, {}).get("exec", {}).get("command", [])
        script = command[2] if command[:2] == ["sh", "-c"] and len(command) == 3 else ""
        if PROBE_COMMAND[2] not in script:
            errors.append(f"{probe} does not run server/watchdog.py's dead-stub check")
        url = f"http://127.0.0.1:{http}{path}"
        if url not in script:
            errors.append(f"{probe} does not check {url}: {script!r}")
    return errors


def _drain_errors(deploy: dict) -> list[str]:
    spec = deploy["spec"]
    pod = spec["template"]["spec"]
    (c,) = [c for c in pod["containers"] if c["name"] == "triton"]
    errors = []
    if spec["strategy"]["rollingUpdate"]["maxUnavailable"] != 0:
        errors.append("rolling update may take a pod away before its replacement is ready")
    exit_timeout = next(
        int(a.split("=")[1]) for a in c["args"] if a.startswith("--exit-timeout-secs=")
    )
    pre_stop = int(c["lifecycle"]["preStop"]["exec"]["command"][-1])
    # Triton refuses the pipeline's component calls once it has SIGTERM, so the
    # drain is the preStop sleep: it must outlast a request's longest stay.
    queue_timeout = ADMISSION_DEFAULTS["queue_timeout_s"]
    if pre_stop <= queue_timeout:
        errors.append(
            f"preStop {pre_stop}s does not outlast the pipeline's queue_timeout_s "
            f"({queue_timeout}s): requests still running at SIGTERM would fail"
        )
    if pod["terminationGracePeriodSeconds"] <= pre_stop + exit_timeout:
        errors.append(
            f"terminationGracePeriodSeconds={pod['terminationGracePeriodSeconds']} leaves no time after "
            f"preStop {pre_stop}s + --exit-timeout-secs={exit_timeout}: in-flight requests would be killed"
        )
    return errors


def _scaler_errors(kinds: dict[str, list[dict]], deploy: dict) -> list[str]:
    errors = []
    name = deploy["metadata"]["name"]
    scalers = kinds.get("HorizontalPodAutoscaler", []) + kinds.get("ScaledObject", [])
    if scalers and "replicas" in deploy["spec"]:
        errors.append(
            "Deployment sets replicas although an autoscaler owns them (every upgrade would reset the fleet)"
        )
    for s in scalers:
        ref = s["spec"]["scaleTargetRef"]
        if (ref.get("kind", "Deployment"), ref["name"]) != ("Deployment", name):
            errors.append(
                f"{s['kind']} scales {ref.get('kind')}/{ref['name']}, not Deployment/{name}"
            )
    for hpa in kinds.get("HorizontalPodAutoscaler", []):
        for m in hpa["spec"]["metrics"]:
            metric = m["pods"]["metric"]["name"]
            rule = adapter_rule(metric)
            if rule is None:
                errors.append(
                    f"HPA metric {metric!r} is served by no rule in {ADAPTER_VALUES.name}"
                )
                continue
            errors += _queue_errors("adapter seriesQuery", rule["seriesQuery"])
            errors += _queue_errors("adapter metricsQuery", rule["metricsQuery"])
            if not re.fullmatch(rule["name"]["matches"], QUEUE_METRIC):
                errors.append(
                    f"adapter rule renames {rule['name']['matches']!r}, not {QUEUE_METRIC}"
                )
    for so in kinds.get("ScaledObject", []):
        for t in so["spec"]["triggers"]:
            errors += _queue_errors("KEDA trigger", t["metadata"]["query"])
            pods = re.search(r'pod=~"([^"]*)"', t["metadata"]["query"])
            if not pods or not re.fullmatch(pods.group(1), f"{name}-5d9c7b7f4-x2x9q"):
                errors.append(f"KEDA query's pod matcher does not select Deployment {name}'s pods")
    return errors


def consistency_errors(docs: list[dict]) -> list[str]:
    """Every broken reference between the rendered objects, as sentences (empty: consistent)."""
    kinds = by_kind(docs)
    (deploy,) = kinds["Deployment"]
    pod_labels = deploy["spec"]["template"]["metadata"]["labels"]
    errors = []
    if not _matches(deploy["spec"]["selector"]["matchLabels"], pod_labels):
        errors.append("Deployment selector does not match its own pod template")
    other_pods = [j["spec"]["template"]["metadata"].get("labels", {}) for j in kinds.get("Job", [])]
    for svc in kinds.get("Service", []):
        sel = svc["spec"]["selector"]
        if not _matches(sel, pod_labels):
            errors.append(
                f"Service selector does not select the Deployment's pods: {sel} vs {pod_labels}"
            )
        if any(_matches(sel, labels) for labels in other_pods):
            errors.append(f"Service selector {sel} also selects the export Job's pod")
        container_ports = {
            p["name"] for c in deploy["spec"]["template"]["spec"]["containers"] for p in c["ports"]
        }
        for p in svc["spec"]["ports"]:
            if p["targetPort"] not in container_ports:
                errors.append(
                    f"Service port {p['name']} targets {p['targetPort']!r}, no such container port"
                )
    for kind in ("PodDisruptionBudget", "PodMonitor", "ServiceMonitor"):
        for obj in kinds.get(kind, []):
            if not _matches(obj["spec"]["selector"]["matchLabels"], pod_labels):
                errors.append(f"{kind} selector does not select the Deployment's pods")
    for pm in kinds.get("PodMonitor", []):
        names = {
            p["name"] for c in deploy["spec"]["template"]["spec"]["containers"] for p in c["ports"]
        }
        errors += [
            f"PodMonitor scrapes port {e['port']!r}, no such container port"
            for e in pm["spec"]["podMetricsEndpoints"]
            if e["port"] not in names
        ]
    for sm in kinds.get("ServiceMonitor", []):
        names = {p["name"] for s in kinds.get("Service", []) for p in s["spec"]["ports"]}
        errors += [
            f"ServiceMonitor scrapes port {e['port']!r}, no such Service port"
            for e in sm["spec"]["endpoints"]
            if e["port"] not in names
        ]
    errors += _pod_errors(deploy)
    errors += _drain_errors(deploy)
    errors += _scaler_errors(kinds, deploy)
    return errors


def start_script(container: dict) -> tuple[str, list[str]]:
    """The container's shell start script and the arguments it passes on to tritonserver."""
    command = container["command"]
    assert command[:2] == ["/bin/sh", "-c"], shlex.join(command)
    return command[2], list(container.get("args", []))


def strip_for_local(args: list[str]) -> list[str]:
    """Rendered tritonserver args minus the ones a CPU machine replaces (repository, ports, GPU pool)."""
    drop = (
        "--model-repository=",
        "--http-port=",
        "--grpc-port=",
        "--metrics-port=",
        "--cuda-memory-pool-byte-size=",
    )
    return [a for a in args if not a.startswith(drop)]


def mutated(doc: dict, edit) -> dict:
    """A deep copy of ``doc`` changed by ``edit(copy)`` (for the must-fail cases)."""
    out = copy.deepcopy(doc)
    edit(out)
    return out
