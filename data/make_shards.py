"""Write WebDataset shards from raw datasets: ``python -m data.make_shards <subcommand> ...``.

Subcommands come from the modules of ``data/converters/`` (each exposes ``add_parser``), e.g.
``images`` (pretraining shards from a folder or a file list). ``--help`` lists what is installed.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
import traceback

import data.converters as converters_pkg


def discover_converters(subparsers: argparse._SubParsersAction) -> dict[str, str]:
    """Import every module of ``data.converters`` and let it register its subcommands.

    Returns:
        {module name: import error text} for modules that failed to import; each of them gets a
        stub subcommand (named after the module) that reports the error when used.
    """
    failures: dict[str, str] = {}
    for info in sorted(pkgutil.iter_modules(converters_pkg.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module_name = f"{converters_pkg.__name__}.{info.name}"
        try:
            module = importlib.import_module(module_name)
        except Exception:  # noqa: BLE001 - one broken converter must not hide the others
            failures[info.name] = traceback.format_exc(limit=3)
            stub = subparsers.add_parser(info.name, help=f"(broken: {module_name} failed to import)")
            stub.set_defaults(func=None, broken=module_name)
            continue
        if hasattr(module, "add_parser"):
            module.add_parser(subparsers)
    return failures


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, str]]:
    parser = argparse.ArgumentParser(
        prog="python -m data.make_shards",
        description="Convert datasets into WebDataset shards (.tar) for sapiens-train.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="SUBCOMMAND")
    failures = discover_converters(subparsers)
    return parser, failures


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run the chosen converter; returns the process exit status."""
    parser, failures = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if getattr(args, "broken", None):
        print(f"error: converter {args.broken} failed to import:\n{failures[args.command]}",
              file=sys.stderr)  # fmt: skip
        return 2
    try:
        status = args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return int(status or 0)


if __name__ == "__main__":
    sys.exit(main())
