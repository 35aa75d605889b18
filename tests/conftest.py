"""Checks every test module shares."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator

import pytest


@pytest.fixture(scope="module", autouse=True)
def no_sock_ops_left_behind(request: pytest.FixtureRequest) -> Iterator[None]:
    """A sock_ops program left on the cgroup v2 root takes every later connection into its sockhash,
    and no sk_msg program attached after it sees a send: the module that leaks one fails here, not
    the thirty tests after it."""
    if os.geteuid() != 0 or not shutil.which("bpftool"):
        yield
        return
    from receiver.ebpf_go.propagation.skmsg import PropagationError
    from tests.support.held import sock_ops_on_root
    try:
        before = set(sock_ops_on_root())
    except PropagationError:   # no cgroup v2: nothing can be left there
        yield
        return
    yield
    deadline = time.monotonic() + 5.0   # a collector child killed at the end may still be exiting
    while (left := set(sock_ops_on_root()) - before) and time.monotonic() < deadline:
        time.sleep(0.1)
    if left:
        pytest.fail(f"{request.module.__name__} left sock_ops program(s) {sorted(left)} attached to the cgroup "
                    "v2 root (`bpftool cgroup show` lists them): stop what you start")
