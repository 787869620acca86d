"""The command line: `main` runs a command (see `main`); `parser` builds the parser, one
function per command; the commands are grouped by what they do with the index (`indexing`,
`searching`, `maintenance`, `serving`); `options` holds what they share."""

from searchengine.app.cli.main import COMMANDS, WRITERS, main
from searchengine.app.cli.options import EXIT_ERROR, EXIT_USAGE
from searchengine.app.cli.parser import build_parser

__all__ = ["COMMANDS", "WRITERS", "EXIT_ERROR", "EXIT_USAGE", "build_parser", "main"]
