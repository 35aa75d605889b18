"""The ebpf_go receiver's subcommands of `otelgo-collector`: `inspect` (what would be traced in a
Go binary or process) and `check` (what this host allows). Their modules are imported when run, so
that listing the commands costs nothing."""

from __future__ import annotations

import argparse

from collector.component import Command


def _inspect_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", metavar="PATH|PID")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--functions", action="append", metavar="GLOB",
                   help="what function spans for this Go symbol or glob would trace (repeatable)")


def _inspect(args: argparse.Namespace) -> int:
    from .gobinary import inspect

    extra = [a for g in args.functions or () for a in ("--functions", g)]
    return inspect.main([args.target] + (["--json"] if args.json else []) + extra)


def _check(args: argparse.Namespace) -> int:
    from . import hostcheck

    return hostcheck.main([])


COMMANDS = (
    Command("inspect", "show what would be traced in a Go binary or process", _inspect_arguments, _inspect),
    Command("check", "what this host allows the eBPF receiver, with the fix for each gap (0 tracing can work, 1 not)",
            lambda p: None, _check),
)
