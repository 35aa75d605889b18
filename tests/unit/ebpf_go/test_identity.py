"""identity.py: container.id and k8s.pod.uid from /proc/<pid>/cgroup as each runtime names its cgroups,
process.owner from /proc/<pid>/status, host.id from machine-id. The e2e counterpart (real processes
in real cgroups, through the CLI) is tests/e2e/test_resource_identity.py."""

from __future__ import annotations

import os
import pwd
from pathlib import Path

import pytest

from receiver.ebpf_go.identity import container_of, host_attributes, process_attributes

CID = "3f0c1b3a5e7d9f1a2b4c6d8e0f1a3b5c7d9e1f3a5b7c9d1e3f5a7b9c1d3e5f70"
CID2 = "aa" * 32
POD = "1b2c3d4e-5f60-4a7b-8c9d-0e1f2a3b4c5d"
POD_ = POD.replace("-", "_")


@pytest.mark.parametrize("text, expected", [
    # containerd under the kubelet, systemd driver, cgroup v2
    (f"0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{POD_}.slice/cri-containerd-{CID}.scope\n",
     {"container.id": CID, "k8s.pod.uid": POD}),
    # Guaranteed QoS has no QoS slice
    (f"0::/kubepods.slice/kubepods-pod{POD_}.slice/cri-containerd-{CID}.scope\n",
     {"container.id": CID, "k8s.pod.uid": POD}),
    # CRI-O, systemd driver
    (f"0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{POD_}.slice/crio-{CID}.scope\n",
     {"container.id": CID, "k8s.pod.uid": POD}),
    # cgroupfs driver: plain directories, the uid with dashes
    (f"0::/kubepods/besteffort/pod{POD}/{CID}\n", {"container.id": CID, "k8s.pod.uid": POD}),
    # seen from a pod's own cgroup namespace: the path climbs out first
    (f"0::/../../kubepods-besteffort-pod{POD_}.slice/cri-containerd-{CID}.scope\n",
     {"container.id": CID, "k8s.pod.uid": POD}),
    # Docker: systemd driver, cgroupfs driver
    (f"0::/system.slice/docker-{CID}.scope\n", {"container.id": CID}),
    (f"0::/docker/{CID}\n", {"container.id": CID}),
    # Podman with systemd inside the container
    (f"0::/machine.slice/libpod-{CID}.scope/container\n", {"container.id": CID}),
    # cgroup v1: one line per hierarchy
    (f"12:pids:/docker/{CID}\n11:memory:/docker/{CID}\n1:name=systemd:/docker/{CID}\n0::/\n", {"container.id": CID}),
    (f"5:cpu,cpuacct:/kubepods/burstable/pod{POD}/{CID}\n0::/\n", {"container.id": CID, "k8s.pod.uid": POD}),
    # v2 line first when both name a container
    (f"3:memory:/docker/{CID2}\n0::/system.slice/docker-{CID}.scope\n", {"container.id": CID}),
    # no container: a host service, a session, a pod-less slice, CRI-O's monitor, a short hex name
    ("0::/system.slice/nginx.service\n", {}),
    ("0::/user.slice/user-1000.slice/session-3.scope\n", {}),
    (f"0::/kubepods.slice/kubepods-pod{POD_}.slice/crio-conmon-{CID}.scope\n", {}),
    ("4:memory:/process_api/e4f475284a0dc2a2b4e4be27cc9c45fb\n0::/\n", {}),
    ("", {}),
])
def test_container_of(text: str, expected: dict[str, str]) -> None:
    assert container_of(text) == expected


def test_process_attributes_from_proc(tmp_path: Path) -> None:
    me = tmp_path / "42"
    me.mkdir()
    (me / "status").write_text("Name:\tapi\nUid:\t0\t0\t0\t0\nGid:\t0\t0\t0\t0\n")
    (me / "cgroup").write_text(f"0::/system.slice/docker-{CID}.scope\n")
    assert process_attributes(42, proc=str(tmp_path)) == {"process.owner": pwd.getpwuid(0).pw_name,
                                                           "container.id": CID}
    # a uid this host has no name for (a container's own user): the number
    (me / "status").write_text("Uid:\t4000123\t4000123\t4000123\t4000123\n")
    (me / "cgroup").write_text("0::/\n")
    assert process_attributes(42, proc=str(tmp_path)) == {"process.owner": "4000123"}
    # gone meanwhile: nothing, no error
    assert process_attributes(43, proc=str(tmp_path)) == {}


def test_process_attributes_of_this_process() -> None:
    attrs = process_attributes(os.getpid())
    assert attrs["process.owner"] == pwd.getpwuid(os.getuid()).pw_name


def test_host_attributes(tmp_path: Path) -> None:
    etc, dbus = tmp_path / "machine-id", tmp_path / "dbus-machine-id"
    dbus.write_text("0123456789abcdef0123456789abcdef\n")
    got = host_attributes((str(etc), str(dbus)))
    assert got["host.id"] == "0123456789abcdef0123456789abcdef" and got["os.type"] == "linux"
    etc.write_text("fedcba9876543210fedcba9876543210\n")
    assert host_attributes((str(etc), str(dbus)))["host.id"] == "fedcba9876543210fedcba9876543210"
    etc.write_text("")      # systemd's empty machine-id before first boot: the next file
    assert host_attributes((str(etc), str(dbus)))["host.id"] == "0123456789abcdef0123456789abcdef"
    assert "host.id" not in host_attributes((str(tmp_path / "none"),))
