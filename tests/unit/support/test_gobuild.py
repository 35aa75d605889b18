"""tests/support/gobuild.py: the cache key of a fixture build and its module pins (no Go build)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.gobuild import RECIPE, GoBuildError, fixture_key, pin_modules

GRPC = "google.golang.org/grpc"
PROTO = "github.com/golang/protobuf"


def test_key_without_modules_is_the_one_builds_always_had() -> None:
    # binaries cached before `modules` existed stay valid
    assert fixture_key("httpserver", "go1.21.5", "pie", "0123abcd") == f"httpserver-1.21-pie-0123abcd{RECIPE}"
    assert fixture_key("httpserver", "system", "plain", "0123abcd", None) == fixture_key(
        "httpserver", "system", "plain", "0123abcd", {})


def test_key_tells_module_versions_apart() -> None:
    plain = fixture_key("grpcapp", "1.27", "plain", "h")
    k40 = fixture_key("grpcapp", "1.27", "plain", "h", {GRPC: "v1.40.0"})
    k50 = fixture_key("grpcapp", "1.27", "plain", "h", {GRPC: "v1.50.1"})
    assert len({plain, k40, k50}) == 3
    assert k40.startswith("grpcapp-1.27-plain-m") and k40.endswith(f"-h{RECIPE}")
    assert "/" not in k40  # a directory name under .cache/fixtures


def test_key_does_not_depend_on_the_order_of_the_pins() -> None:
    a = fixture_key("grpcapp", "1.21", "plain", "h", {GRPC: "v1.40.0", PROTO: "v1.5.4"})
    b = fixture_key("grpcapp", "1.21", "plain", "h", {PROTO: "v1.5.4", GRPC: "v1.40.0"})
    assert a == b
    assert a != fixture_key("grpcapp", "1.21", "plain", "h", {GRPC: "v1.40.0"})


@pytest.mark.parametrize("modules", [{GRPC: ""}, {"": "v1.0.0"}, {GRPC: "v1.4 0"}, {GRPC + "@v1": "v1.40.0"}])
def test_bad_pin_refused_before_go_runs(modules: dict[str, str], tmp_path: Path) -> None:
    with pytest.raises(GoBuildError, match="bad module pin"):
        pin_modules(Path("/nonexistent/go"), tmp_path, modules, {}, "building x")
