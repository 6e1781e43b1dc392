"""User-facing errors: bad input gets one clear line and exit code 2, never a traceback."""
from __future__ import annotations

import functools
import sys


class UserError(Exception):
    """Something the user can fix (a bad path, flag or data set). The CLIs print it and exit 2."""


def cli(main):
    """Wrap a CLI entry point: UserError -> 'error: ...' on stderr and exit 2; Ctrl-C -> exit 130."""
    @functools.wraps(main)
    def wrapper(argv=None):
        try:
            return main(argv)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(2)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            raise SystemExit(130)
    return wrapper
