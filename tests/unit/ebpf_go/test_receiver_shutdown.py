"""The receiver's shutdown leaves nothing attached, even while the propagation mode is still being
chosen on its own thread (the sk_msg programs spend 1.6 s in the kernel's verifier on an idle host,
and several times that on a busy one). A sock_ops program left on the cgroup root would take every
new connection of the host and keep any later sk_msg program from seeing them."""

from __future__ import annotations

import gc
import logging
import os
import threading
from typing import Any

import pytest

pytestmark = pytest.mark.root

if os.geteuid() != 0 and os.environ.get("CI") != "true":
    pytest.skip("needs root and eBPF (never skipped under CI=true)", allow_module_level=True)

from collector.component import ComponentID  # noqa: E402
from collector.telemetry import ComponentTelemetry, SelfMetrics  # noqa: E402
from receiver.ebpf_go import receiver as receiver_module  # noqa: E402
from receiver.ebpf_go.config import EbpfGoConfig  # noqa: E402
from receiver.ebpf_go.receiver import factory  # noqa: E402
from tests.support.held import open_fds, sock_ops_on_root  # noqa: E402


def start(propagation: str = "sk_msg") -> Any:
    # A selector no process matches: only the propagation mode is set up.
    cfg = EbpfGoConfig.model_validate({"targets": [{"exe_path": "/nonexistent/otelgo-test"}],
                                       "propagation": propagation})
    r = factory.create(ComponentID("ebpf_go"), cfg, ComponentTelemetry("receiver", "ebpf_go", SelfMetrics()), None)
    r.start(None)
    assert r.enabled, "receiver did not start (see log)"
    return r


def test_shutdown_at_once_waits_for_the_chooser() -> None:
    attached = sock_ops_on_root()
    gc.collect()
    fds0 = open_fds()
    r = start()
    r.shutdown(timeout=0.1)   # far shorter than the verifier takes: the chooser is waited for all the same
    assert r._chooser is not None and not r._chooser.is_alive()
    assert sock_ops_on_root() == attached
    gc.collect()
    assert open_fds() == fds0


def test_a_chooser_done_after_shutdown_stops_what_it_attached(monkeypatch: pytest.MonkeyPatch,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    real_choose = receiver_module.propagation.choose
    attached_now, release = threading.Event(), threading.Event()

    def choose_then_stall(*args: Any, **kwargs: Any) -> Any:
        chosen = real_choose(*args, **kwargs)   # sock_ops and sk_msg attached
        attached_now.set()
        release.wait(60)
        return chosen

    monkeypatch.setattr(receiver_module.propagation, "choose", choose_then_stall)
    monkeypatch.setattr(receiver_module, "CHOOSER_JOIN_S", 0.2)
    attached = sock_ops_on_root()
    gc.collect()
    fds0 = open_fds()
    r = start()
    assert attached_now.wait(60)
    assert len(sock_ops_on_root()) == len(attached) + 1
    caplog.set_level(logging.WARNING)
    r.shutdown(timeout=0.2)
    # (other threads may be named too on a busy machine: each had only 0.2 s)
    assert "ebpf_go shutdown: thread ebpf_go-propagation still running after 0 s; going on without it" in [
        rec.getMessage() for rec in caplog.records]
    release.set()
    r._chooser.join(30)
    assert r.propagation is None
    assert sock_ops_on_root() == attached
    gc.collect()
    assert open_fds() == fds0
