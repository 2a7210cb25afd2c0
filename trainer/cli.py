"""``prefero-train``: the trainer's command line.

Subcommands (``reward``, ``score``, ``ppo``) are registered here as each stage lands; the
trainer reads only prefero's export format and never imports the service (``app``).
"""

from __future__ import annotations

import argparse

from trainer import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prefero-train",
        description="Train reward models and policies from prefero exports.",
    )
    parser.add_argument("--version", action="version", version=f"prefero-train {__version__}")
    parser.add_subparsers(dest="command", title="commands")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
