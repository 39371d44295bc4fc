"""``imhub bench``: load generator (filled in below)."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", help="gateway base URL; default: start a server")


def main(args: argparse.Namespace) -> int:
    raise SystemExit("not yet")
