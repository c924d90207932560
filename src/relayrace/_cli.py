"""The ``relayrace`` command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="relayrace", description="LLM request failover over ranked provider actors."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("demo", help="run the built-in demo on scripted providers")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from ._demo import main as demo

        demo()
    return 0


if __name__ == "__main__":
    sys.exit(main())
