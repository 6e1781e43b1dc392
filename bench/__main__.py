"""``python -m bench``: the whole benchmark suite in one process; see bench/suite.py."""
import argparse
import sys
from pathlib import Path

from bench import suite


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m bench", description=suite.__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="about 2 minutes: fewer rounds, R=64 steps only, 128² sampling, smaller op shapes")
    p.add_argument("--only", nargs="+", choices=list(suite.SECTIONS), metavar="SECTION",
                   help=f"run only these sections ({', '.join(suite.SECTIONS)}); peaks and features always run")
    p.add_argument("--out", type=Path, default=None,
                   help="the JSON file (default bench/results/<date>-<host>[-quick].json)")
    args = p.parse_args(argv)
    return suite.run(args.only or list(suite.SECTIONS), args.quick, args.out, argv)


if __name__ == "__main__":
    sys.exit(main())
