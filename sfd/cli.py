"""The `sfd` console command: `sfd assets list|path|fetch NAME`, `sfd bench distill ...`."""
from __future__ import annotations

import sys

from sfd.assets.cli import main as assets_main
from sfd.bench import main as bench_main

USAGE = "usage: sfd {assets,bench} ...   (e.g. `sfd assets list`, `sfd bench distill --arch tiny`)"
COMMANDS = {"assets": assets_main, "bench": bench_main}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"sfd: unknown command {command!r}\n{USAGE}", file=sys.stderr)
        return 2
    return COMMANDS[command](rest)


if __name__ == "__main__":
    sys.exit(main())
