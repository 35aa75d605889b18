"""deploy/kubernetes: every manifest against the Kubernetes OpenAPI schema (kubernetes-validate, strict:
an unknown or misplaced field fails), the ConfigMap's config through our own `validate`, and what the
DaemonSet grants and mounts against what the config and the receiver need."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from receiver.ebpf_go import preflight
from tests.support.collector import run_cli

DEPLOY = Path(__file__).resolve().parents[3] / "deploy"
MANIFESTS = sorted((DEPLOY / "kubernetes").glob("*.yaml"))
# appArmorProfile in the securityContext is a field from Kubernetes 1.30 on
VERSIONS = ["1.30.0", kubernetes_validate.latest_version()]


def docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def by_kind(kind: str) -> dict[str, Any]:
    found = [d for p in MANIFESTS for d in docs(p) if d["kind"] == kind]
    assert len(found) == 1, (kind, len(found))
    return found[0]


def test_the_manifests_are_there() -> None:
    assert {d["kind"] for p in MANIFESTS for d in docs(p)} == {"Namespace", "ConfigMap", "DaemonSet"}


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_matches_the_kubernetes_schema(path: Path, version: str) -> None:
    for doc in docs(path):
        kubernetes_validate.validate(doc, version, strict=True)


def test_the_schema_check_catches_a_misplaced_field() -> None:
    ds = by_kind("DaemonSet")
    ds["spec"]["template"]["spec"]["containers"][0]["securityContext"]["hostPID"] = True   # belongs in the pod spec
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(ds, VERSIONS[-1], strict=True)


def agent_config() -> dict[str, Any]:
    return dict(yaml.safe_load(by_kind("ConfigMap")["data"]["config.yaml"]))


def test_configmap_config_is_valid(tmp_path: Path) -> None:
    cfg = tmp_path / "config.yaml"
    cfg.write_text(by_kind("ConfigMap")["data"]["config.yaml"])
    proc = run_cli("validate", "--config", str(cfg), env={"K8S_NODE_NAME": "node-1"})
    assert (proc.returncode, proc.stderr.strip()) == (0, "configuration is valid"), proc.stdout
    c = agent_config()
    assert c["receivers"]["ebpf_go"] == {}        # every Go process on the node
    assert c["service"]["pipelines"]["traces"]["exporters"] == ["otlp"]
    assert c["exporters"]["otlp"]["endpoint"].endswith(":4317")


def container() -> dict[str, Any]:
    return dict(by_kind("DaemonSet")["spec"]["template"]["spec"]["containers"][0])


def test_daemonset_grants_what_the_receiver_checks_for_and_no_more() -> None:
    pod = by_kind("DaemonSet")["spec"]["template"]["spec"]
    sc = container()["securityContext"]
    assert pod["hostPID"] is True
    assert sc["privileged"] is False and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert {f"CAP_{c}" for c in sc["capabilities"]["add"]} == set(preflight.GRANTED_CAPABILITIES)
    assert set(preflight.REQUIRED_CAPABILITIES) <= set(preflight.GRANTED_CAPABILITIES)


def test_daemonset_mounts_what_the_receiver_reads() -> None:
    pod = by_kind("DaemonSet")["spec"]["template"]["spec"]
    host_paths = {v["name"]: v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v}
    mounts = {m["name"]: m["mountPath"] for m in container()["volumeMounts"]}
    for path in ("/sys/fs/bpf", "/sys/kernel/security", "/sys/fs/cgroup", "/etc/machine-id",
                 "/var/cache/otelgo-collector"):
        name = next(n for n, p in host_paths.items() if p == path)
        assert mounts[name] == path, path
    # the BPF program cache is where the receiver writes it by default
    from receiver.ebpf_go.config import EbpfGoConfig
    assert EbpfGoConfig().bpf_cache_dir.startswith(mounts[next(n for n, p in host_paths.items()
                                                               if p == "/var/cache/otelgo-collector")])
    config_mount = mounts[next(v["name"] for v in pod["volumes"] if "configMap" in v)]
    assert container()["args"] == ["--config", f"{config_mount}/config.yaml"]


def test_daemonset_ports_are_the_configs() -> None:
    c = agent_config()
    ports = {p["name"]: p["containerPort"] for p in container()["ports"]}
    reader = c["service"]["telemetry"]["metrics"]["readers"][0]["pull"]["exporter"]["prometheus"]
    assert ports["metrics"] == reader["port"] and reader["host"] == "0.0.0.0"
    health = c["extensions"]["health_check"]["endpoint"]
    assert health == f"0.0.0.0:{ports['health']}"
    assert container()["livenessProbe"]["httpGet"] == {"path": "/", "port": "health"}
    annotations = by_kind("DaemonSet")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(ports["metrics"])
    # the node's name reaches host.name
    env = {e["name"]: e for e in container()["env"]}
    assert env["K8S_NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert {"key": "host.name", "value": "${env:K8S_NODE_NAME}", "action": "upsert"} in \
        c["processors"]["resource"]["attributes"]


def test_grace_period_is_the_units_stop_timeout() -> None:
    unit = (DEPLOY / "systemd" / "otelgo-collector.service").read_text()
    m = re.search(r"^TimeoutStopSec=(\d+)s$", unit, re.M)
    assert m is not None
    pod = by_kind("DaemonSet")["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == int(m.group(1))


def test_units_capabilities_are_the_daemonsets() -> None:
    unit = (DEPLOY / "systemd" / "otelgo-collector.service").read_text()
    m = re.search(r"^CapabilityBoundingSet=(.+)$", unit, re.M)
    assert m is not None
    assert set(m.group(1).split()) == {f"CAP_{c}" for c in container()["securityContext"]["capabilities"]["add"]}


def test_gateway_agent_config_is_valid() -> None:
    proc = run_cli("validate", "--config", str(DEPLOY / "gateway" / "agent.yaml"), env=dict(os.environ))
    assert (proc.returncode, proc.stderr.strip()) == (0, "configuration is valid"), proc.stdout
