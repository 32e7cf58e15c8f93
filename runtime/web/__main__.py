"""python -m runtime.web: the browser client with every web flag (--token, --max-sessions, ...).

The same server as `python -m runtime.webcam --serve`, with the flags of runtime/web/config.py
added to that parser. Example: python -m runtime.web --steps 1 --window 3 --port 8000
Errors and exit codes as every command (models/cli.py): one `error: ...` line, 1 for a bad flag or
file (checked before the model loads), 2 for usage, 130/143 for Ctrl-C/SIGTERM; --debug for the traceback.
"""
from __future__ import annotations

import logging
import sys


def _main(argv=None) -> int:
    from runtime import webcam
    from runtime.web.config import add_arguments
    p = webcam.parser()
    p.prog = "python -m runtime.web"
    if not any(act.dest == "max_sessions" for act in p._actions):  # runtime.webcam may add them itself
        add_arguments(p)
    a = p.parse_args(["--serve", *(sys.argv[1:] if argv is None else argv)])
    logging.basicConfig(level=logging.INFO if a.debug else logging.WARNING, format="%(message)s")
    return webcam.run(a)


def main(argv=None) -> int:
    from models.cli import run_main
    return run_main(_main, argv, expected=(RuntimeError, KeyError))


if __name__ == "__main__":
    sys.exit(main())
