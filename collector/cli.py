"""`otelgo-collector`: run (default), validate, components, and the subcommands components bring
(the ebpf_go receiver's inspect and check)."""

from __future__ import annotations

import argparse
import sys

import yaml

from collector import config as configmod
from collector.component import Factory, Kind
from collector.errors import ConfigError
from collector.registry import load_factories
from collector.telemetry import collector_version, setup_logging

EPILOG = """examples:
  otelgo-collector --config config.yaml
  otelgo-collector --config base.yaml --config prod.yaml --set exporters.otlp.endpoint=otel:4317
  otelgo-collector validate --config config.yaml
  otelgo-collector components
  otelgo-collector inspect /usr/local/bin/myservice --json
  otelgo-collector inspect 4242
  otelgo-collector check

exit codes: 0 ok, 1 runtime failure, 2 invalid configuration or usage"""


def _version() -> str:
    return collector_version()


def _add_config_flags(p: argparse.ArgumentParser, prefix: str = "") -> None:
    # Subcommands store under their own names: argparse would let their defaults erase the
    # values given before the subcommand.
    p.add_argument("--config", action="append", default=[], metavar="URI", dest=prefix + "config",
                   help="config file (PATH, file:PATH, env:VAR or yaml:key::sub: value); repeatable, later wins")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest=prefix + "set",
                   help="override one option, e.g. processors.batch.timeout=2s; applied after every --config")


def _parser(factories: dict[tuple[Kind, str], Factory] | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="otelgo-collector", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="An OpenTelemetry-Collector-style agent that traces Go programs with eBPF, untouched.")
    p.add_argument("--version", action="version", version=f"otelgo-collector version {_version()}")
    _add_config_flags(p)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    run = sub.add_parser("run", help="run the collector (the default)")
    _add_config_flags(run, "sub_")
    val = sub.add_parser("validate", help="check the configuration and exit (0 valid, 2 invalid)")
    _add_config_flags(val, "sub_")
    sub.add_parser("components", help="list the available components as YAML")
    seen: set[int] = set()
    for f in (factories if factories is not None else load_factories()).values():
        if id(f) in seen:   # a factory is indexed under its aliases too
            continue
        seen.add(id(f))
        for c in f.commands:
            cp = sub.add_parser(c.name, help=c.help)
            c.add_arguments(cp)
            cp.set_defaults(component_command=c)
    return p


def _components() -> int:
    factories = load_factories()
    out: dict[str, object] = {"buildinfo": {"command": "otelgo-collector", "version": _version()}}
    for kind in (Kind.RECEIVER, Kind.PROCESSOR, Kind.EXPORTER, Kind.CONNECTOR, Kind.EXTENSION):
        items = []
        for (k, t), f in sorted(factories.items(), key=lambda kv: kv[0][1]):
            if k != kind or t != f.type:
                continue
            item: dict[str, object] = {"name": f.type, "stability": {"traces": f.stability}}
            if f.aliases:
                item["aliases"] = list(f.aliases)
            if f.description:
                item["description"] = f.description
            items.append(item)
        out[kind.value + "s"] = items
    sys.stdout.write(yaml.safe_dump(out, sort_keys=False))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "components":
        return _components()
    command = getattr(args, "component_command", None)
    if command is not None:
        return int(command.run(args))
    setup_logging()  # until the config's own logs section applies: warnings while loading it
    try:
        factories = load_factories()
        cfg = configmod.load(args.config + getattr(args, "sub_config", []),
                             args.set + getattr(args, "sub_set", []), factories)
    except ConfigError as e:
        print(f"Error: invalid configuration: {e}", file=sys.stderr)
        return 2
    if args.command == "validate":
        print("configuration is valid", file=sys.stderr)
        return 0
    from collector.service import Service

    return Service(cfg).run()


if __name__ == "__main__":
    sys.exit(main())
