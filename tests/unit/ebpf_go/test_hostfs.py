"""hostfs: mounts are read from the mount table, never assumed; the lockdown file is parsed."""

from __future__ import annotations

from pathlib import Path

import pytest

from collector.errors import KernelError
from receiver.ebpf_go import hostfs

TABLE = """sysfs /sys sysfs rw,nosuid 0 0
tmpfs /sys/fs/cgroup tmpfs rw 0 0
cgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0
none /sys/fs/bpf bpf rw 0 0
tmpfs /sys/fs/bpf tmpfs rw 0 0
/dev/vda /srv/my\\040data ext4 rw 0 0
"""


def test_the_last_mount_on_a_path_counts_and_escapes_are_read(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    table = tmp_path / "mounts"
    table.write_text(TABLE)
    real = hostfs.mounts
    monkeypatch.setattr(hostfs, "mounts", lambda path=str(table): real(path))
    assert hostfs.mounted_type("/sys/fs/bpf") == "tmpfs"        # a tmpfs over bpffs hides it
    assert hostfs.cgroup2_root() == "/sys/fs/cgroup/unified"    # hybrid hierarchy
    assert hostfs.mounted_type("/srv/my data") == "ext4"
    assert hostfs.mounted_type("/sys/kernel/security") is None


@pytest.mark.parametrize("text,mode", [("none [integrity] confidentiality\n", "integrity"),
                                       ("[none] integrity confidentiality\n", "none"), ("garbage", None)])
def test_lockdown_mode_is_the_bracketed_word(tmp_path: Path, text: str, mode: str | None) -> None:
    f = tmp_path / "lockdown"
    f.write_text(text)
    assert hostfs.read_lockdown(str(f)) == mode
    assert hostfs.read_lockdown(str(tmp_path / "absent")) is None


def test_a_bpffs_that_cannot_be_mounted_names_the_fix(tmp_path: Path) -> None:
    with pytest.raises(KernelError) as e:
        hostfs.ensure_bpffs(str(tmp_path / "missing"))
    msg = str(e.value)
    assert msg.startswith(f"bpf is not mounted at {tmp_path}/missing and mounting it failed (")
    assert msg.endswith(f"or run `mount -t bpf bpf {tmp_path}/missing`") and "\n" not in msg
