"""python -m runtime.web: the browser client with every web flag (--token, --max-sessions, ...).

The same server as `python -m runtime.webcam --serve`, with the flags of runtime/web/config.py
added to that parser. Example: python -m runtime.web --steps 1 --window 3 --port 8000
"""
from __future__ import annotations

import logging
import sys


def main(argv=None) -> int:
    from runtime import webcam
    from runtime.web.config import add_arguments
    p = webcam.parser()
    p.prog = "python -m runtime.web"
    if not any(act.dest == "max_sessions" for act in p._actions):  # runtime.webcam may add them itself
        add_arguments(p)
    a = p.parse_args(["--serve", *(sys.argv[1:] if argv is None else argv)])
    logging.basicConfig(level=logging.INFO if a.debug else logging.WARNING, format="%(message)s")
    try:
        return webcam.run(a)
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # noqa: BLE001 - one line for the user; --debug shows the traceback
        if a.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
