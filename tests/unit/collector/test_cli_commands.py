"""Components bring their own subcommands: the core lists them from the factories and knows none
by name (the ebpf_go receiver's `inspect` and `check`)."""

from __future__ import annotations

import argparse

import pytest

from collector import cli
from collector.component import Command, Factory, Kind
from collector.registry import load_factories


def test_the_core_knows_no_component_command_by_name() -> None:
    import inspect as pyinspect
    src = pyinspect.getsource(cli)
    assert "receiver." not in src and "hostcheck" not in src and "gobinary" not in src


def test_commands_come_from_the_factories(capsys: pytest.CaptureFixture[str]) -> None:
    ran: list[argparse.Namespace] = []

    def add(p: argparse.ArgumentParser) -> None:
        p.add_argument("name")

    def run(args: argparse.Namespace) -> int:
        ran.append(args)
        return 7

    factories = dict(load_factories())
    extra = Factory(type="demo", kind=Kind.EXTENSION, config_model=factories[(Kind.RECEIVER, "otlp")].config_model,
                    create=lambda *a: None, commands=(Command("hello", "say hello", add, run),))
    factories[(Kind.EXTENSION, "demo")] = extra
    factories[(Kind.EXTENSION, "demo_alias")] = extra     # an alias: its commands are added once
    args = cli._parser(factories).parse_args(["hello", "world"])
    assert args.component_command.run(args) == 7 and ran[0].name == "world"
    names = {c.name for f in load_factories().values() for c in f.commands}
    assert names == {"inspect", "check"}


def test_inspect_runs_through_the_receivers_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["inspect", "/bin/ls"]) == 1
    assert capsys.readouterr().err.strip() == "inspect: /bin/ls: not a Go executable (no Go build info)"
