"""deploy/kubernetes/: the manifests validated against a current Kubernetes' schemas (and the
PodMonitor against the Prometheus Operator's), the Deployment's grace period checked against the
ConfigMap's config, and that config checked and served by sockd."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from sockd.config import InetListener
from sockd.config.loader import parse

from support import ROOT, Launcher, datagram, eventually, health, request, run_sockd

DEPLOY = ROOT / "deploy" / "kubernetes"
KUBERNETES = "1.37.0"  # the newest release kubernetes-validate knows (its default)
BUILT_IN = ("configmap.yaml", "deployment.yaml", "service.yaml")


def manifest(name: str) -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load((DEPLOY / name).read_text())
    return document


def sockd_config() -> str:
    return str(manifest("configmap.yaml")["data"]["sockd.yaml"])


def validate(*paths: Path) -> subprocess.CompletedProcess[str]:
    # The console script beside this Python: the test extra installs it.
    command = [str(Path(sys.executable).parent / "kubernetes-validate"), "--strict", "-k", KUBERNETES]
    return subprocess.run([*command, *map(str, paths)], capture_output=True, text=True, timeout=120, check=False)


def test_the_manifests_are_valid_for_a_current_kubernetes_rejecting_unknown_fields() -> None:
    assert {path.name for path in DEPLOY.glob("*.yaml")} == {*BUILT_IN, "podmonitor.yaml"}
    result = validate(*(DEPLOY / name for name in BUILT_IN))
    assert result.returncode == 0, result.stdout + result.stderr
    passed = [line for line in result.stdout.splitlines() if " passed for resource " in line]
    assert len(passed) == len(BUILT_IN), result.stdout


def test_the_podmonitor_is_valid_for_the_prometheus_operator() -> None:
    # kubernetes-validate has no schema for a custom resource: it warns and passes it.
    result = validate(DEPLOY / "podmonitor.yaml")
    assert "Couldn't find schema for kind PodMonitor" in result.stdout + result.stderr
    # So it is read by the models generated from the operator's CRDs (cloudcoil's), which check
    # each field's type and pattern; they ignore a field they do not know, so a field the CRD
    # lacks (a typo) shows as one missing from what they read.
    from cloudcoil.models.prometheus_operator.v1 import PodMonitor  # noqa: PLC0415 (57,000 lines: here alone)

    document = manifest("podmonitor.yaml")
    read = PodMonitor.model_validate(document).model_dump(mode="json", by_alias=True, exclude_none=True)
    assert read == document


def test_the_grace_period_outlasts_the_configs_drain_and_shutdown() -> None:
    config = parse(sockd_config(), "configmap.yaml")
    pod = manifest("deployment.yaml")["spec"]["template"]["spec"]
    assert config.drain_delay > 0  # the drain is sockd's own: the Deployment has no preStop
    assert "lifecycle" not in pod["containers"][0]
    assert pod["terminationGracePeriodSeconds"] > config.drain_delay + config.shutdown_timeout


def test_the_manifests_agree_with_each_other_and_with_the_config() -> None:
    """What no schema sees: the names and ports that tie the files together."""
    config = parse(sockd_config(), "configmap.yaml")
    deployment, service, monitor = (manifest(name) for name in ("deployment.yaml", "service.yaml", "podmonitor.yaml"))
    pod = deployment["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert service["spec"]["selector"].items() <= labels.items()
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pod["spec"]["volumes"][0]["configMap"]["name"] == manifest("configmap.yaml")["metadata"]["name"]
    # Each listener's port, and the metrics endpoint's, declared on the container under a name
    # (the listener's), which the Service, the probe and the PodMonitor name.
    container = pod["spec"]["containers"][0]
    ports = {(port["name"], port["containerPort"], port["protocol"]) for port in container["ports"]}
    listeners = [listener for listener in config.listeners if isinstance(listener, InetListener)]
    assert len(listeners) == len(config.listeners)  # a Unix socket would be reachable in the pod alone
    wanted = {(listener.name, listener.port, listener.protocol.upper()) for listener in listeners}
    assert ports == {*wanted, ("metrics", config.metrics.port, "TCP")}
    assert {(port["targetPort"], port["protocol"]) for port in service["spec"]["ports"]} == {
        (name, protocol) for name, _, protocol in wanted
    }
    assert container["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert [endpoint["port"] for endpoint in monitor["spec"]["podMetricsEndpoints"]] == ["metrics"]


def test_the_configmaps_config_passes_check_and_is_served(start_sockd: Launcher) -> None:
    (path := start_sockd.directory / "sockd.yaml").write_text(sockd_config())
    checked = run_sockd("--check", "-c", str(path))
    assert checked.returncode == 0, checked.stderr
    assert checked.stderr == ""  # no warning either (an amplifying UDP handler would have one)
    # Served as it is but on loopback, at ports of the kernel's choosing (parallel tests).
    config = yaml.safe_load(sockd_config())
    listeners = [{**entry, "host": "127.0.0.1", "port": 0} for entry in config.pop("listeners")]
    settings = {key: value for key, value in config.items() if key not in ("metrics", "logging")}
    daemon = start_sockd(listeners, **settings)
    assert request(daemon.address("tcp-echo"), b"over tcp") == b"over tcp"
    assert datagram(daemon.address("udp-echo"), b"over udp") == b"over udp"
    eventually(lambda: health(daemon) == (200, "ok\n"), "/healthz 200, the readiness probe's answer")
    # SIGTERM, as the kubelet sends it: the readiness probe fails at once, and the listeners serve
    # on for drain_delay; a second signal stops it there (the test need not wait out the delay).
    daemon.process.send_signal(signal.SIGTERM)
    eventually(lambda: health(daemon) == (503, "draining\n"), "/healthz 503 draining")
    assert request(daemon.address("tcp-echo"), b"while draining") == b"while draining"
    assert daemon.stop() == 0
