"""The Helm chart (deploy/helm/sd-triton) and the KServe example, checked offline.

What runs here, with no cluster: ``helm lint --strict``; ``helm template`` of
every values scenario for three Kubernetes minors; every object validated
against a strict schema (Kubernetes kinds: kubernetes-validate; KEDA,
prometheus-operator and KServe objects: the CRD schemas pinned in
deploy/schemas); the references between objects that no schema sees; broken
values and manifests that must fail; and the container's start script run
with a real tritonserver, proving the admin-API lock it builds. What needs a
cluster (admission, the scaling control loops, GPU scheduling) is listed in
docs/kubernetes.md.
"""

from __future__ import annotations

import os
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from k8s_manifests import (
    ROOT,
    RenderError,
    by_kind,
    consistency_errors,
    ensure_helm,
    mutated,
    render,
    start_script,
    strip_for_local,
    validate,
)

from sd_triton.server.launcher import Ports, prepare_backends, pytriton_root, server_env

KUBE_VERSIONS = ("1.29.0", "1.32.0", "1.35.0")
MONITORING = "monitoring.coreos.com/v1"
KEDA = "keda.sh/v1alpha1"
ADMIN = {"adminKey": {"secretName": "sd-triton-admin"}}
S3 = {
    "source": "s3",
    "uri": "s3://models/sd-triton/sd15-v1",
    "credentialsSecret": "sd-triton-s3",
    "s3Region": "eu-west-1",
}
GCS = {
    "source": "gcs",
    "uri": "gs://models/sd-triton/sd15-v1",
    "credentialsSecret": "sd-triton-gcs",
}

# name -> (values, APIs the cluster has beyond the built-in ones, kinds expected)
SCENARIOS = {
    "pvc-defaults": (
        {},
        (MONITORING,),
        {"Deployment", "Service", "ServiceAccount", "PodDisruptionBudget", "PodMonitor"},
    ),
    "no-operator-api": ({}, (), {"Deployment", "Service", "ServiceAccount", "PodDisruptionBudget"}),
    "monitoring-off": (
        {"monitoring": {"enabled": False}},
        (MONITORING,),
        {"Deployment", "Service"},
    ),
    "servicemonitor": (
        {"monitoring": {"kind": "ServiceMonitor"}},
        (MONITORING,),
        {"ServiceMonitor"},
    ),
    "hpa-s3-key": (
        {"autoscaling": {"mode": "hpa"}, "modelRepository": S3, **ADMIN},
        (MONITORING,),
        {"HorizontalPodAutoscaler", "PodMonitor"},
    ),
    "keda-gcs-key-tls": (
        {
            "autoscaling": {"mode": "keda"},
            "modelRepository": GCS,
            **ADMIN,
            "tls": {"grpc": {"enabled": True, "secretName": "sd-triton-grpc-tls"}},
        },
        (MONITORING, KEDA),
        {"ScaledObject"},
    ),
    "keda-pvc-mutual-tls": (
        {
            "autoscaling": {"mode": "keda"},
            "tls": {"grpc": {"enabled": True, "secretName": "sd-triton-grpc-tls", "mutual": True}},
        },
        (KEDA,),
        {"ScaledObject"},
    ),
    "export-job-and-every-option": (
        {
            "exportJob": {
                "enabled": True,
                "checkpoint": {"claimName": "checkpoints", "path": "sd15"},
            },
            "modelRepository": {"pvc": {"subPath": "sd15-v1"}},
            "imagePullSecrets": [{"name": "registry"}],
            "podAnnotations": {"example.com/team": "imaging"},
            "podLabels": {"tier": "gpu"},
            "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
            "priorityClassName": "inference",
            "readinessGates": [{"conditionType": "target-health.example.com/sd"}],
            "serviceAccount": {
                "annotations": {"eks.amazonaws.com/role-arn": "arn:aws:iam::1:role/sd"}
            },
            "service": {"type": "LoadBalancer", "annotations": {"example.com/lb": "internal"}},
            "monitoring": {"labels": {"release": "prometheus"}},
            "extraArgs": ["--log-info=true"],
            "extraEnv": [{"name": "CUDA_MODULE_LOADING", "value": "LAZY"}],
        },
        (MONITORING,),
        {"Job", "Deployment"},
    ),
}


@pytest.fixture(scope="module")
def helm() -> Path:
    return ensure_helm(Path(os.environ.get("SD_TRITON_HELM_DIR", ROOT / "build" / "helm")))


@pytest.fixture(scope="module")
def hpa_docs(helm) -> list[dict]:
    values, apis, _ = SCENARIOS["hpa-s3-key"]
    return render(helm, values, kube_version="1.32.0", api_versions=apis)


def _triton(docs: list[dict]) -> dict:
    (deploy,) = by_kind(docs)["Deployment"]
    return deploy["spec"]["template"]["spec"]["containers"][0]


def test_lint_strict(helm):
    for extra in ([], ["--set", "autoscaling.mode=hpa"]):
        proc = subprocess.run(
            [helm, "lint", "--strict", ROOT / "deploy/helm/sd-triton", *extra],
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("name", SCENARIOS)
def test_scenario_renders_valid_and_consistent(helm, name):
    values, apis, expected = SCENARIOS[name]
    for version in KUBE_VERSIONS:
        docs = render(helm, values, kube_version=version, api_versions=apis)
        kinds = set(by_kind(docs))
        assert expected <= kinds, f"{name} on {version}: {kinds}"
        for doc in docs:
            validate(doc, version)
        assert consistency_errors(docs) == [], name
    if MONITORING not in apis:
        assert not kinds & {"PodMonitor", "ServiceMonitor"}
    assert ("HorizontalPodAutoscaler" in kinds) == (
        values.get("autoscaling", {}).get("mode") == "hpa"
    )


def test_lock_and_storage_reach_the_pod(helm):
    """The values that matter for security and storage end up in the container, not just in values."""
    s3 = _triton(render(helm, SCENARIOS["hpa-s3-key"][0], kube_version="1.32.0"))
    assert "--model-repository=s3://models/sd-triton/sd15-v1" in s3["args"]
    assert {"--model-control-mode=explicit", "--load-model=*"} <= set(s3["args"])
    env = {e["name"]: e for e in s3["env"]}
    assert env["SD_TRITON_ADMIN_KEY_FILE"]["value"] == "/var/run/secrets/sd-triton/admin/admin-key"
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "sd-triton-s3"
    plain = _triton(render(helm, {}, kube_version="1.32.0"))
    assert "--model-control-mode=none" in plain["args"] and "env" not in plain
    assert not any(a.startswith("--grpc-use-ssl") for a in plain["args"])
    tls = _triton(
        render(
            helm, SCENARIOS["keda-pvc-mutual-tls"][0], kube_version="1.32.0", api_versions=(KEDA,)
        )
    )
    assert {
        "--grpc-use-ssl-mutual=true",
        "--grpc-root-cert=/var/run/secrets/sd-triton/tls/ca.crt",
    } <= set(tls["args"])


def test_every_option_reaches_the_manifests(helm):
    values, apis, _ = SCENARIOS["export-job-and-every-option"]
    kinds = by_kind(render(helm, values, kube_version="1.32.0", api_versions=apis))
    pod = kinds["Deployment"][0]["spec"]["template"]
    for key in ("imagePullSecrets", "nodeSelector", "priorityClassName", "readinessGates"):
        assert pod["spec"][key] == values[key], key
    assert pod["metadata"]["annotations"] == values["podAnnotations"]
    assert pod["metadata"]["labels"]["tier"] == "gpu"
    container = pod["spec"]["containers"][0]
    assert "--log-info=true" in container["args"]
    assert values["extraEnv"][0] in container["env"]
    assert "--model-repository=/models/sd15-v1" in container["args"]
    (job,) = kinds["Job"]
    assert job["spec"]["template"]["spec"]["containers"][0]["command"][1:4] == [
        "/checkpoint/sd15",
        "/models/sd15-v1",
        "--overwrite",
    ]
    assert (
        kinds["ServiceAccount"][0]["metadata"]["annotations"]
        == values["serviceAccount"]["annotations"]
    )
    assert kinds["Service"][0]["spec"]["type"] == "LoadBalancer"
    assert kinds["PodMonitor"][0]["metadata"]["labels"]["release"] == "prometheus"


def test_kserve_example_validates_and_matches_the_chart(helm):
    runtime, isvc = (
        yaml.safe_load((ROOT / "deploy/kserve" / f).read_text())
        for f in ("servingruntime.yaml", "inferenceservice.yaml")
    )
    for version in KUBE_VERSIONS:
        assert validate(runtime, version) == "schemas/ServingRuntime"
        assert validate(isvc, version) == "schemas/InferenceService"
    (container,) = runtime["spec"]["containers"]
    chart = _triton(render(helm, ADMIN, kube_version="1.32.0"))
    assert start_script(container)[0] == start_script(chart)[0], (
        "the KServe runtime's start script differs from the chart's"
    )
    assert container["image"] == f"{chart['image']}"
    assert set(strip_for_local(container["args"])) == set(strip_for_local(chart["args"]))
    for probe in ("readinessProbe", "livenessProbe"):
        ours = [a.replace(":8000/", ":8080/") for a in chart[probe]["exec"]["command"]]
        assert container[probe]["exec"]["command"] == ours, probe
    model = isvc["spec"]["predictor"]["model"]
    assert (model["runtime"], model["modelFormat"]["name"]) == (
        runtime["metadata"]["name"],
        runtime["spec"]["supportedModelFormats"][0]["name"],
    )
    exit_timeout = next(
        int(a.split("=")[1]) for a in container["args"] if a.startswith("--exit-timeout-secs=")
    )
    assert isvc["spec"]["predictor"]["terminationGracePeriodSeconds"] > exit_timeout + 10


def test_chart_image_is_the_compose_image(helm):
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    chart = yaml.safe_load((ROOT / "deploy/helm/sd-triton/Chart.yaml").read_text())
    assert _triton(render(helm, {}, kube_version="1.32.0"))["image"] == compose["x-image"]["image"]
    assert compose["x-image"]["build"]["args"]["TRITON_VERSION"] == chart["appVersion"]


BAD_VALUES = {
    "unquoted tag (24.10 is the number 24.1)": ({"image": {"tag": 24.10}}, "image.tag"),
    "s3 source with a path": (
        {"modelRepository": {"source": "s3", "uri": "/models"}},
        "modelRepository.uri",
    ),
    "gcs source with an s3 uri": (
        {"modelRepository": {"source": "gcs", "uri": "s3://b/p"}},
        "modelRepository.uri",
    ),
    "unknown autoscaler": ({"autoscaling": {"mode": "knative"}}, "autoscaling.mode"),
    "misspelt key": ({"autoscaling": {"maxReplica": 4}}, "maxReplica"),
    "tls without a secret": ({"tls": {"grpc": {"enabled": True}}}, "tls.grpc.secretName"),
    "no gpu limit": (
        {"resources": {"limits": {"nvidia.com/gpu": None, "memory": "8Gi"}}},
        "nvidia.com/gpu",
    ),
    "export job into object storage": (
        {"exportJob": {"enabled": True, "checkpoint": {"claimName": "c"}}, "modelRepository": S3},
        "modelRepository.source",
    ),
    "secret key with a slash": (
        {"adminKey": {"secretName": "k", "secretKey": "a/b"}},
        "adminKey.secretKey",
    ),
    "min above max": (
        {"autoscaling": {"minReplicas": 5, "maxReplicas": 2}},
        "minReplicas (5) is above",
    ),
    "exit timeout too short for a diffusion request": (
        {"rollout": {"exitTimeoutSeconds": 5}},
        "exitTimeoutSeconds",
    ),
}


@pytest.mark.parametrize("case", BAD_VALUES)
def test_bad_values_are_rejected(helm, case):
    values, expected = BAD_VALUES[case]
    with pytest.raises(RenderError) as err:
        render(helm, values, kube_version="1.32.0", api_versions=(MONITORING, KEDA))
    assert expected in str(err.value)


def test_keda_without_its_api_is_refused(helm):
    with pytest.raises(RenderError, match="no keda.sh/v1alpha1 API"):
        render(helm, {"autoscaling": {"mode": "keda"}}, kube_version="1.32.0")


def test_wrong_objects_fail_their_schemas(helm):
    keda = by_kind(
        render(
            helm,
            SCENARIOS["keda-pvc-mutual-tls"][0],
            kube_version="1.32.0",
            api_versions=(KEDA, MONITORING),
        )
    )
    so, pm, deploy = keda["ScaledObject"][0], keda["PodMonitor"][0], keda["Deployment"][0]
    runtime = yaml.safe_load((ROOT / "deploy/kserve/servingruntime.yaml").read_text())

    def set_threshold_int(d):
        d["spec"]["triggers"][0]["metadata"]["threshold"] = 2

    wrong = [
        mutated(so, set_threshold_int),  # KEDA trigger metadata is map[string]string
        mutated(so, lambda d: d["spec"].update(maxReplicas=4)),  # HPA's name, not KEDA's
        mutated(
            pm, lambda d: d["spec"].update(podMetricEndpoints=d["spec"].pop("podMetricsEndpoints"))
        ),
        mutated(
            runtime, lambda d: d["spec"]["containers"][0].update(gpus=1)
        ),  # core Container schema
        mutated(runtime, lambda d: d["spec"]["supportedModelFormats"][0].update(autoSelect="yes")),
        mutated(runtime, lambda d: d["metadata"].update(annotations={"port": 8002})),  # ObjectMeta
    ]
    for doc in wrong:
        with pytest.raises(jsonschema.ValidationError):
            validate(doc, "1.32.0")
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(
            mutated(deploy, lambda d: d["spec"]["template"]["spec"].update(gracePeriod=30)),
            "1.32.0",
        )
    with pytest.raises(kubernetes_validate.SchemaNotFoundError):  # never a silent pass
        validate(
            {"apiVersion": "example.com/v1", "kind": "Unknown", "metadata": {"name": "x"}}, "1.32.0"
        )


def _deploy_spec(d):
    return d["spec"]["template"]["spec"]


def _probe(kinds, probe, old, new):
    command = _deploy_spec(kinds["Deployment"][0])["containers"][0][probe]["exec"]["command"]
    command[2] = command[2].replace(old, new)


BROKEN = {
    "Service selector does not select": lambda k: k["Service"][0]["spec"]["selector"].update(
        {"app.kubernetes.io/component": "web"}
    ),
    "HorizontalPodAutoscaler scales Deployment/other": lambda k: k["HorizontalPodAutoscaler"][0][
        "spec"
    ]["scaleTargetRef"].update(name="other"),
    "is served by no rule": lambda k: k["HorizontalPodAutoscaler"][0]["spec"]["metrics"][0]["pods"][
        "metric"
    ].update(name="sd_pending"),
    "mounts volume 'admin-key', which the pod does not have": lambda k: _deploy_spec(
        k["Deployment"][0]
    )["volumes"].pop(),
    "which no mounted Secret provides": lambda k: _deploy_spec(k["Deployment"][0])["containers"][0][
        "env"
    ][0].update(value="/var/run/secrets/sd-triton/admin/other"),
    "readinessProbe does not check http://127.0.0.1:8000/v2/health/ready": lambda k: _probe(
        k, "readinessProbe", ":8000/", ":8080/"
    ),
    "livenessProbe does not check http://127.0.0.1:8000/v2/health/live": lambda k: _probe(
        k, "livenessProbe", "/live", "/ready"
    ),
    "livenessProbe does not run server/watchdog.py's dead-stub check": lambda k: _probe(
        k, "livenessProbe", " Z ", " D "
    ),
    "startupProbe checks": lambda k: _deploy_spec(k["Deployment"][0])["containers"][0][
        "startupProbe"
    ]["httpGet"].update(port="metrics"),
    "in-flight requests would be killed": lambda k: _deploy_spec(k["Deployment"][0]).update(
        terminationGracePeriodSeconds=60
    ),
    "does not outlast the pipeline's queue_timeout_s": lambda k: _deploy_spec(k["Deployment"][0])[
        "containers"
    ][0]["lifecycle"]["preStop"]["exec"].update(command=["sleep", "10"]),
    "Deployment sets replicas": lambda k: k["Deployment"][0]["spec"].update(replicas=3),
    "PodMonitor scrapes port 'prometheus'": lambda k: k["PodMonitor"][0]["spec"][
        "podMetricsEndpoints"
    ][0].update(port="prometheus"),
}


@pytest.mark.parametrize("expected", BROKEN)
def test_broken_references_are_caught(hpa_docs, expected):
    assert consistency_errors(hpa_docs) == []
    docs = [mutated(d, lambda _: None) for d in hpa_docs]
    BROKEN[expected](by_kind(docs))
    errors = consistency_errors(docs)
    assert any(expected in e for e in errors), errors


def test_autoscaling_reads_the_pipeline_queue_not_the_unet(helm):
    docs = render(
        helm, {"autoscaling": {"mode": "keda"}}, kube_version="1.32.0", api_versions=(KEDA,)
    )
    assert consistency_errors(docs) == []
    so = by_kind(docs)["ScaledObject"][0]
    unet = mutated(
        so,
        lambda d: d["spec"]["triggers"][0]["metadata"].update(
            query=d["spec"]["triggers"][0]["metadata"]["query"].replace("stable_diffusion", "unet")
        ),
    )
    errors = consistency_errors([unet if d is so else d for d in docs])
    assert any("reads model='unet'" in e for e in errors), errors


# --------------------------------------------------------------------------- the start script, run


def _run_start_script(container: dict, tmp_path: Path, env_extra: dict[str, str]):
    """Run the rendered start script with the pip-installed tritonserver on an empty repository."""
    script, args = start_script(container)
    shim = tmp_path / "bin"
    shim.mkdir(exist_ok=True)
    (shim / "tritonserver").symlink_to(pytriton_root() / "bin" / "tritonserver")
    (tmp_path / "repo").mkdir(exist_ok=True)
    ports = Ports.free()
    local = [
        f"--model-repository={tmp_path / 'repo'}",
        f"--backend-directory={prepare_backends(tmp_path / 'backends')}",
        f"--http-port={ports.http}",
        f"--grpc-port={ports.grpc}",
        f"--metrics-port={ports.metrics}",
        "--http-address=127.0.0.1",
        "--grpc-address=127.0.0.1",
        "--pinned-memory-pool-byte-size=0",
        "--allow-gpu-metrics=false",
    ]
    env = {**server_env(), **env_extra}
    env["PATH"] = f"{shim}:{env['PATH']}"
    proc = subprocess.Popen(
        ["/bin/sh", "-c", script, "tritonserver", *strip_for_local(args), *local],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    return proc, f"http://127.0.0.1:{ports.http}"


def _status(url: str, method: str = "GET", headers: dict | None = None) -> int:
    req = urllib.request.Request(
        url, method=method, headers=headers or {}, data=b"{}" if method == "POST" else None
    )
    try:
        with urllib.request.urlopen(req, timeout=2) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return 0


def _wait_ready(proc, base: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while _status(f"{base}/v2/health/ready") != 200:
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, "tritonserver did not become ready"
        time.sleep(0.1)


def _probe_rc(container: dict, probe: str, base: str) -> int:
    """Exit status of the container's exec probe, pointed at the local server."""
    command = [
        a.replace("http://127.0.0.1:8000", base) for a in container[probe]["exec"]["command"]
    ]
    env = {**os.environ, "PATH": server_env()["PATH"]}  # python3 of this environment
    return subprocess.run(command, env=env, capture_output=True, timeout=30).returncode


def _stop(proc) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.mark.server
def test_start_script_locks_the_admin_apis(helm, tmp_path):
    """The chart's own start script and arguments, run: admin APIs need the Secret's key."""
    container = _triton(render(helm, ADMIN, kube_version="1.32.0"))
    key = "k8s-test-key-0123456789abcdef"
    (tmp_path / "admin-key").write_text(key + "\n")  # as `kubectl create secret --from-file` may
    proc, base = _run_start_script(
        container, tmp_path, {"SD_TRITON_ADMIN_KEY_FILE": str(tmp_path / "admin-key")}
    )
    try:
        _wait_ready(proc, base)
        index = f"{base}/v2/repository/index"
        assert _status(index, "POST") == 403
        assert _status(index, "POST", {"sd-triton-admin-key": "wrong-key-0123456789"}) == 403
        assert _status(index, "POST", {"sd-triton-admin-key": key}) == 200
        assert _status(f"{base}/v2/health/live") == 200  # probes need no key
        assert _status(f"{base}/v2/logging", "POST") == 403
        assert _probe_rc(container, "readinessProbe", base) == 0
        assert _probe_rc(container, "livenessProbe", base) == 0
    finally:
        _stop(proc)
    assert proc.returncode == 0
    assert _probe_rc(container, "readinessProbe", base) != 0  # the server is gone


@pytest.mark.server
def test_start_script_without_a_key_locks_everyone_out(helm, tmp_path):
    container = _triton(render(helm, {}, kube_version="1.32.0"))
    proc, base = _run_start_script(container, tmp_path, {})
    try:
        _wait_ready(proc, base)
        assert _status(f"{base}/v2/repository/index", "POST") == 403
        assert (
            _status(f"{base}/v2/repository/models/x/load", "POST", {"sd-triton-admin-key": ""})
            == 403
        )
    finally:
        _stop(proc)


@pytest.mark.parametrize("key", ["", "short", "has spaces in it but long enough"])
def test_start_script_refuses_a_bad_key_file(helm, tmp_path, key):
    container = _triton(render(helm, ADMIN, kube_version="1.32.0"))
    (tmp_path / "admin-key").write_text(key)
    proc, _ = _run_start_script(
        container, tmp_path, {"SD_TRITON_ADMIN_KEY_FILE": str(tmp_path / "admin-key")}
    )
    try:
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:  # the script started a server it should have refused
            _stop(proc)
    assert proc.returncode == 1 and "must be 16 or more" in out
