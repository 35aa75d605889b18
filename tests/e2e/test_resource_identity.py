"""Who the traced process is, end to end: Go servers started inside cgroups named the way containerd,
CRI-O, the kubelet's cgroupfs driver and Docker name theirs (cgroup v2, and a cgroup v1 hierarchy of
the test's own), one left where it was, all traced by the real CLI; the resource of each one's spans
carries exactly its container.id and k8s.pod.uid, and the host's and owner's attributes.

The cgroups are made under a directory of this test's own and removed at the end; the cgroup v2
hierarchy is found in /proc/self/mounts (mounted here if the host has none), and the v1 hierarchy is a
named one without controllers, mounted by the test (no host needs cgroup v1 mounted for it).
"""

from __future__ import annotations

import os
import pwd
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from collector.spans import from_json_dict
from receiver.ebpf_go import hostfs
from tests.support.ci import needs_root
from tests.support.collector import CollectorProcess, json_lines
from tests.support.gobuild import build_go_fixture
from tests.support.goserver import Server

pytestmark = [*needs_root(), pytest.mark.timeout(300)]

POD_A = "1b2c3d4e-5f60-4a7b-8c9d-0e1f2a3b4c5d"
POD_B = "9a8b7c6d-5e4f-4a3b-9c1d-2e3f4a5b6c7d"
POD_C = "0f1e2d3c-4b5a-4968-8776-655443322110"


def cid(n: int) -> str:
    return f"{n:02x}" * 32


# case -> (cgroup v2 path, cgroup v1 path, the container attributes its spans must carry)
CASES: dict[str, tuple[str | None, str | None, dict[str, str]]] = {
    "containerd-systemd": (
        "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod" + POD_A.replace("-", "_")
        + f".slice/cri-containerd-{cid(1)}.scope", None, {"container.id": cid(1), "k8s.pod.uid": POD_A}),
    "crio-systemd": (
        "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod" + POD_B.replace("-", "_")
        + f".slice/crio-{cid(2)}.scope", None, {"container.id": cid(2), "k8s.pod.uid": POD_B}),
    "kubelet-cgroupfs": (f"kubepods/burstable/pod{POD_C}/{cid(3)}", None,
                         {"container.id": cid(3), "k8s.pod.uid": POD_C}),
    "docker-systemd": (f"system.slice/docker-{cid(4)}.scope", None, {"container.id": cid(4)}),
    "docker-cgroupfs-v1": (None, f"docker/{cid(5)}", {"container.id": cid(5)}),
    "no-container": (None, None, {}),
}


class Cgroups:
    """Directories made in one hierarchy, removed (deepest first) by `remove`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.made: list[Path] = []

    def make(self, rel: str) -> Path:
        path = self.root
        for part in rel.split("/"):
            path = path / part
            if not path.exists():
                path.mkdir()
                self.made.append(path)
        return path

    def remove(self) -> None:
        for path in reversed(self.made):
            for _ in range(50):   # a killed process leaves its cgroup a moment later
                try:
                    path.rmdir()
                    break
                except OSError:
                    time.sleep(0.1)


@pytest.fixture
def hierarchies() -> Iterator[tuple[Cgroups, Cgroups]]:
    mounted: list[str] = []
    v2_mount = hostfs.find_mount("cgroup2")
    if v2_mount is None:
        v2_mount = tempfile.mkdtemp(prefix="otelgo-cgroup2-")
        subprocess.run(["mount", "-t", "cgroup2", "none", v2_mount], check=True)
        mounted.append(v2_mount)
    v1_mount = tempfile.mkdtemp(prefix="otelgo-cgroup1-")
    subprocess.run(["mount", "-t", "cgroup", "-o", "none,name=otelgo_e2e", "cgroup", v1_mount], check=True)
    mounted.append(v1_mount)
    v2 = Cgroups(Path(v2_mount))
    v2.make(f"otelgo-e2e-{os.getpid()}")
    v2.root = v2.made[0]
    v1 = Cgroups(Path(v1_mount))
    try:
        yield v2, v1
    finally:
        v2.remove()
        v1.remove()
        for m in reversed(mounted):
            subprocess.run(["umount", m], check=False)
            if m.startswith(tempfile.gettempdir()):
                os.rmdir(m)


def enter(*cgroups: Path) -> Callable[[], None]:
    """In the child, before the exec: move itself (`0` = the writer) into each cgroup."""
    def run() -> None:
        for cg in cgroups:
            with open(cg / "cgroup.procs", "w") as f:
                f.write("0")
    return run


def resource_of(out: Path) -> dict[str, dict[str, Any]]:
    """service.name -> the resource attributes of its spans (the last seen)."""
    got: dict[str, dict[str, Any]] = {}
    for doc in json_lines(out):
        for rs, _, _ in from_json_dict(doc).iter_spans():
            got[str(rs.resource.attributes["service.name"])] = dict(rs.resource.attributes)
    return got


def test_container_and_pod_ids_per_runtime(tmp_path: Path, hierarchies: tuple[Cgroups, Cgroups]) -> None:
    v2, v1 = hierarchies
    binary = build_go_fixture("httpserver", "1.26")
    servers: dict[str, Server] = {}
    try:
        for case, (v2_path, v1_path, _) in CASES.items():
            cgs = ([v2.make(v2_path)] if v2_path else []) + ([v1.make(v1_path)] if v1_path else [])
            servers[case] = Server(binary, preexec_fn=enter(*cgs))
        for case, (v2_path, v1_path, _) in CASES.items():   # they are where we put them
            text = Path(f"/proc/{servers[case].pid}/cgroup").read_text()
            for p in (v2_path, v1_path):
                assert p is None or p in text, (case, text)
        out = tmp_path / "spans.jsonl"
        cfg = {"receivers": {"ebpf_go": {
                   "targets": [{"pid": s.pid, "service_name": case} for case, s in servers.items()],
                   "discovery_interval": "200ms", "instrumentations": {"database_sql": False}}},
               "exporters": {"file": {"path": str(out), "flush_interval": "100ms"}},
               "service": {"pipelines": {"traces": {"receivers": ["ebpf_go"], "exporters": ["file"]}}}}
        with CollectorProcess(cfg, tmp_path) as col:
            deadline = time.monotonic() + 60
            got: dict[str, dict[str, Any]] = {}
            while time.monotonic() < deadline and len(got) < len(CASES):
                for s in servers.values():
                    s.request("GET", "/hello")
                time.sleep(0.3)
                got = resource_of(out)
            assert sorted(got) == sorted(CASES), col.log()[-3000:]
            assert col.stop() == 0, col.log()[-3000:]
    finally:
        for s in servers.values():
            s.stop()

    ids = [Path(f).read_text().strip() for f in ("/etc/machine-id", "/var/lib/dbus/machine-id") if Path(f).exists()]
    machine_id = next((i for i in ids if i), None)
    for case, (_, _, container) in CASES.items():
        res = got[case]
        assert res["process.pid"] == servers[case].pid
        assert res["process.owner"] == pwd.getpwuid(os.getuid()).pw_name
        assert res["host.name"] == socket.gethostname()
        assert res.get("host.id") == machine_id
        assert res["os.type"] == "linux"
        assert {k: res[k] for k in ("container.id", "k8s.pod.uid") if k in res} == container, case
