"""User-facing errors and the one wrapper every CLI uses.

Exit codes, the same for every command: 0 done; 1 the work ran and failed a check (``CheckFailed``,
e.g. an export that ONNX Runtime disagrees with); 2 bad input the user can fix (``UserError``: a bad
path, flag or data set); 128 + the signal's number when a signal stopped it (``Interrupted``: 143
for SIGTERM, 130 for SIGINT/Ctrl-C, what schedulers read as "interrupted", not "done"). Each gets
its lines on stderr, never a traceback.
"""
from __future__ import annotations

import functools
import sys


class UserError(Exception):
    """Something the user can fix (a bad path, flag or data set). The CLIs print it and exit 2."""


class CheckFailed(RuntimeError):
    """The command ran but its result failed a check; nothing wrong was left behind. Exit 1."""


class Interrupted(Exception):
    """Work stopped cleanly on a signal (the trainer saved a checkpoint first): exit 128 + signum."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum


EXIT_CHECK_FAILED, EXIT_USER_ERROR, EXIT_INTERRUPTED = 1, 2, 130


def cli(main):
    """Wrap a CLI entry point: UserError -> 'error: ...' and exit 2; CheckFailed -> exit 1;
    Interrupted -> its message and exit 128 + signum; Ctrl-C -> exit 130."""
    @functools.wraps(main)
    def wrapper(argv=None):
        try:
            return main(argv)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(EXIT_USER_ERROR)
        except CheckFailed as e:
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(EXIT_CHECK_FAILED)
        except Interrupted as e:
            print(str(e), file=sys.stderr)
            raise SystemExit(128 + e.signum)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            raise SystemExit(EXIT_INTERRUPTED)
    return wrapper
