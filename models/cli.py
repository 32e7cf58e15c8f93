"""One entry-point wrapper for every command: expected failures become one `error: ...` line.

    def main(argv=None) -> int:
        return run_main(_main, argv)          # _main(argv) parses its arguments and raises on failure

Exit codes (README, docs/reliability.md):

| code | meaning |
|---|---|
| 0 | success |
| 1 | bad input or environment the user can fix: the message names the file or flag and the fix |
| 2 | command-line usage (argparse: unknown option, bad choice, missing argument) |
| 3 | internal error (a bug): rerun with --debug for the traceback, and report it |
| 130 | interrupted by Ctrl-C (SIGINT) |
| 143 | terminated by SIGTERM |

Interrupts end cleanly: SIGINT and SIGTERM raise `Interrupted` (a KeyboardInterrupt) in the main
thread, so `finally` blocks and `models.fileio.atomic_output` remove temp files and never leave a
half-written output under its final name. A second signal during that cleanup is ignored.
`--debug` (accepted by every command, or XPORTRAIT_DEBUG=1) adds the traceback.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Sequence

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERNAL = 0, 1, 2, 3
EXIT_SIGINT, EXIT_SIGTERM = 128 + signal.SIGINT, 128 + signal.SIGTERM


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM, raised in the main thread so cleanup code runs."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    """Accept --debug (the wrapper reads it from argv; the parser only documents it)."""
    parser.add_argument("--debug", action="store_true", help="on failure, print the full traceback")


def _expected() -> tuple[type[BaseException], ...]:
    """Exceptions whose message names the problem and the fix: exit 1 without a traceback.
    (Evaluated only once an exception is raised; imports nothing that is not loaded already.)"""
    errors: list[type[BaseException]] = [ValueError, OSError, ImportError]
    if "models.finite" in sys.modules:
        errors.append(sys.modules["models.finite"].NonFiniteError)
    torch = sys.modules.get("torch")
    if torch is not None and hasattr(torch, "OutOfMemoryError"):
        errors.append(torch.OutOfMemoryError)
    return tuple(errors)


def one_line(e: BaseException) -> str:
    """The exception's message on one line: lines joined with '; ' (or ' ' after a colon)."""
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        text = f"{e.filename}: {e.strerror}" + (f" -> {e.filename2}" if e.filename2 else "")
        if isinstance(e, PermissionError):
            text += " (check the file's permissions or choose another path)"
        elif e.errno == 28:  # ENOSPC
            text += " (free some space or choose another output folder)"
    elif isinstance(e, ImportError) and e.name and str(e).startswith("No module named"):
        text = (f"the Python package {e.name!r} is missing: install this project's extras "
                "(bash scripts/setup.sh app export ..., see README)")
    elif isinstance(e, KeyError) and len(e.args) == 1 and isinstance(e.args[0], str):
        text = e.args[0]  # str(KeyError) wraps the message in quotes
    else:
        text = str(e) if e.args else type(e).__name__
    lines = [s.strip() for s in text.splitlines() if s.strip()]
    out = ""
    for s in lines:
        out += s if not out else ((" " if out.endswith(":") else "; ") + s)
    return out or type(e).__name__


def _debug(argv: Sequence[str] | None) -> bool:
    args = sys.argv[1:] if argv is None else argv
    head = list(args)[:list(args).index("--")] if "--" in args else list(args)
    return "--debug" in head or os.environ.get("XPORTRAIT_DEBUG", "") not in ("", "0")


class _Signals:
    """Turn SIGINT/SIGTERM into Interrupted (once) while the command runs; restore afterwards."""

    def __init__(self):
        self.saved: dict[int, object] = {}
        self.fired = False

    def _handler(self, signum, frame):
        if self.fired:  # cleanup in progress: let it finish
            return
        self.fired = True
        raise Interrupted(signum)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                current = signal.getsignal(sig)
                if current is not signal.SIG_IGN:  # respect an inherited ignore (nohup, background jobs)
                    self.saved[sig] = current
                    signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc):
        for sig, handler in self.saved.items():
            signal.signal(sig, handler)


def run_main(main: Callable[[list[str] | None], int | None], argv: Sequence[str] | None = None,
             expected: tuple[type[BaseException], ...] = ()) -> int:
    """Run `main(argv)`; map failures to the exit codes above with one `error: ...` line on stderr.

    expected: extra exception types (beyond ValueError, OSError, ImportError, NonFiniteError and
    torch.OutOfMemoryError) whose messages name the fix. argparse's SystemExit passes through.
    """
    debug = _debug(argv)
    argv = None if argv is None else list(argv)
    try:
        with _Signals():
            code = main(argv)
        return EXIT_OK if code is None else int(code)
    except KeyboardInterrupt as e:
        signum = getattr(e, "signum", signal.SIGINT)
        if debug:
            traceback.print_exc()
        name = "SIGTERM" if signum == signal.SIGTERM else "Ctrl-C (SIGINT)"
        print(f"error: interrupted by {name}; outputs in progress were removed, earlier files are unchanged",
              file=sys.stderr)
        return EXIT_SIGTERM if signum == signal.SIGTERM else EXIT_SIGINT
    except (*_expected(), *expected) as e:
        if debug:
            traceback.print_exc()
        print(f"error: {one_line(e)}", file=sys.stderr)
        return EXIT_ERROR
    except Exception as e:  # a bug: say so, keep it to one line unless --debug
        if debug:
            traceback.print_exc()
        print(f"error: internal error ({type(e).__name__}: {one_line(e)}); rerun with --debug for the "
              "traceback and report it", file=sys.stderr)
        return EXIT_INTERNAL
    finally:
        sys.stderr.flush()
