"""Who a traced process is, for the resource of its spans: the host it runs on and the container and
pod it runs in, read from /proc and /etc once per process when it is first traced.

A node agent sends ids, not names: a gateway collector's k8sattributes processor turns
`k8s.pod.uid` (or `container.id`) into pod names, namespaces and labels.

| attribute      | read from                                                                        |
|----------------|----------------------------------------------------------------------------------|
| host.name      | gethostname() (in a pod, the pod's name: deploy/kubernetes sets the node's instead) |
| host.id        | /etc/machine-id, else /var/lib/dbus/machine-id (as the OpenTelemetry SDKs do);  |
|                | in a container, mount the host's file there (deploy/kubernetes does)             |
| os.type        | `linux`                                                                          |
| process.owner  | the real uid on the `Uid:` line of /proc/<pid>/status, named by our passwd        |
|                | database, else the number (a container's users need not exist on the host)       |
| container.id   | /proc/<pid>/cgroup: the innermost path component naming a 64-hex id, as the     |
|                | runtimes name their cgroups (below)                                              |
| k8s.pod.uid    | the same path: the kubelet's `pod<uid>` component                                |

How runtimes name a container's cgroup (cgroup v2 `0::<path>` or any cgroup v1 line `N:<controllers>:<path>`):

| runtime, cgroup driver      | path                                                                        |
|-----------------------------|-----------------------------------------------------------------------------|
| containerd (kubelet), systemd | `/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid_with_underscores>.slice/cri-containerd-<id>.scope` |
| CRI-O (kubelet), systemd    | `/kubepods.slice/kubepods-pod<uid>.slice/crio-<id>.scope` (not `crio-conmon-<id>.scope`, its monitor) |
| any runtime, cgroupfs       | `/kubepods/besteffort/pod<uid>/<id>`                                        |
| Docker, systemd / cgroupfs  | `/system.slice/docker-<id>.scope` / `/docker/<id>`                          |
| Podman                      | `/machine.slice/libpod-<id>.scope` (maybe followed by `/container`)         |

In another cgroup namespace (a pod of its own) the path may start with `/..`: only components count.
"""

from __future__ import annotations

import pwd
import re
import socket
from typing import Any

_CONTAINER_SCOPE = re.compile(r"^(?:cri-containerd|crio|docker|libpod)-([0-9a-f]{64})\.scope$")
_CONTAINER_DIR = re.compile(r"^([0-9a-f]{64})$")
# kubelet: `pod<uid>` (cgroupfs) or `kubepods[-<qos>]-pod<uid with _ for ->.slice` (systemd)
_POD = re.compile(r"(?:^|-)pod([0-9a-f]{8}(?:[-_][0-9a-f]{4}){3}[-_][0-9a-f]{12})(?:\.slice)?$")

MACHINE_ID_FILES = ("/etc/machine-id", "/var/lib/dbus/machine-id")


def host_attributes(machine_id_files: tuple[str, ...] = MACHINE_ID_FILES) -> dict[str, Any]:
    """The host's attributes, the same for every process (read once per receiver)."""
    attrs: dict[str, Any] = {"host.name": socket.gethostname(), "os.type": "linux"}
    for path in machine_id_files:
        try:
            with open(path, encoding="ascii", errors="replace") as f:
                mid = f.read().strip()
        except OSError:
            continue
        if mid:
            attrs["host.id"] = mid
            break
    return attrs


def container_of(cgroup_text: str) -> dict[str, str]:
    """container.id and k8s.pod.uid from the text of /proc/<pid>/cgroup; {} outside any container.

    The cgroup v2 line (`0::`) is read first, then the v1 lines in order: the first path naming a
    container wins, and its pod (if any) comes from the same path."""
    lines = cgroup_text.splitlines()
    paths = [ln.split(":", 2)[2] for ln in lines if ln.startswith("0::")]
    paths += [ln.split(":", 2)[2] for ln in lines if ln.count(":") >= 2 and not ln.startswith("0::")]
    for path in paths:
        parts = [p for p in path.split("/") if p and p != ".."]
        for part in reversed(parts):
            m = _CONTAINER_SCOPE.match(part) or _CONTAINER_DIR.match(part)
            if m:
                out = {"container.id": m.group(1)}
                for p in parts:
                    pm = _POD.search(p)
                    if pm:
                        out["k8s.pod.uid"] = pm.group(1).replace("_", "-")
                return out
    return {}


def _owner(pid: int, proc: str) -> str | None:
    try:
        with open(f"{proc}/{pid}/status", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("Uid:"):
                    uid = int(line.split()[1])
                    break
            else:
                return None
    except (OSError, ValueError, IndexError):
        return None
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def process_attributes(pid: int, proc: str = "/proc") -> dict[str, Any]:
    """process.owner, and container.id / k8s.pod.uid where the process runs in a container."""
    attrs: dict[str, Any] = {}
    owner = _owner(pid, proc)
    if owner is not None:
        attrs["process.owner"] = owner
    try:
        with open(f"{proc}/{pid}/cgroup", encoding="utf-8", errors="replace") as f:
            attrs.update(container_of(f.read()))
    except OSError:
        pass
    return attrs
