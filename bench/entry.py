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


def number_list(cast, low=None, strict: bool = False, what: str = "numbers"):
    """An argparse ``type``: comma-separated values of ``cast``, each >= ``low`` (> with ``strict``)."""
    def parse(text: str) -> list:
        try:
            out = [cast(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got '{text}'") from None
        if not out:
            raise argparse.ArgumentTypeError(f"expected at least one of the {what}, got '{text}'")
        if low is not None and not all(x > low if strict else x >= low for x in out):
            raise argparse.ArgumentTypeError(f"expected {what} {'>' if strict else '>='} {low}, got '{text}'")
        return out
    return parse
