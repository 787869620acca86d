"""The `searchengine` command's entry point. It answers what needs nothing imported
(`--version`) before the CLI's own imports (SQLAlchemy, numpy, pydantic: 1.2 s on an idle
2-core machine, 5 s on a busy one), then hands over to `searchengine.cli`."""

from __future__ import annotations

import sys
from typing import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args == ["--version"]:
        from searchengine import __version__

        print(f"searchengine {__version__}")
        return 0
    from searchengine.cli import main as cli_main

    return cli_main(args)


if __name__ == "__main__":
    sys.exit(main())
