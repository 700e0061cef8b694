"""Command-line plumbing shared by the benchmarks that read or make runs."""

from __future__ import annotations

import argparse
import sys

from ea4llm_pool import UserError, quiet_transformers


def parser(doc: str) -> argparse.ArgumentParser:
    """An argument parser whose description is the docstring's first line and whose epilog is the
    rest of it (after the usage block)."""
    return argparse.ArgumentParser(description=doc.splitlines()[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog="\n".join(doc.splitlines()[4:]))


def run_main(ap: argparse.ArgumentParser, body) -> None:
    """Parse the arguments and run ``body(args)``; a UserError ends the program with its one line."""
    args = ap.parse_args()
    quiet_transformers()
    try:
        body(args)
    except UserError as err:
        sys.exit(f"error: {err}")
