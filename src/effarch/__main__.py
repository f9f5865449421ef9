"""``python -m effarch doctor``: argument parsing only; the report is ``effarch.doctor``."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m effarch")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("doctor", help="report versions, device, memory, profile and model cache")
    args = parser.parse_args(argv)
    if args.command == "doctor":
        from effarch.doctor import doctor_lines

        print("\n".join(doctor_lines()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
