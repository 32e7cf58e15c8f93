"""Web server limits and bind settings: one dataclass, checked before anything is loaded.

The defaults are the safe ones: loopback only, a few sessions, bounded messages. `add_arguments`
adds the flags to a parser (runtime/web/__main__.py uses it; runtime/webcam.py may too); every flag
is optional, so `from_args` also works on a namespace that lacks them.
"""
from __future__ import annotations

import argparse
import ipaddress
from dataclasses import dataclass, fields, replace



@dataclass(frozen=True)
class WebConfig:
    host: str = "127.0.0.1"          # loopback: reach it through an SSH tunnel or a TLS proxy (docs/web.md)
    port: int = 8000                 # 0 picks a free port (printed at start)
    token: str | None = None         # when set, the WebSocket and /api need ?token=...
    max_sessions: int = 4            # open sessions (tabs); one more gets a "busy" answer
    max_frame_bytes: int = 512 << 10  # one camera frame (JPEG/WebP)
    max_frame_side: int = 1920       # width and height of a camera frame, read from its header
    max_upload_bytes: int = 8 << 20  # one source portrait (JPEG/PNG/WebP)
    max_upload_pixels: int = 24_000_000  # width x height of a portrait, read from its header
    max_rate: float = 60.0           # messages per second per socket (a burst of one second is allowed)
    idle_timeout: float = 60.0       # seconds without a message before a session is closed
    max_in_flight: int = 2           # frames a page may have sent and not had answered
    jpeg_quality: int = 85           # animated frames sent back
    capture_side: int = 480          # longest side of the frames the page sends
    detect_every: int = 2            # face landmarker every K frames per session
    reframe: str = "fixed"           # FaceTracker re-framing: fixed or follow
    allow_origins: tuple[str, ...] = ()  # extra WebSocket origins (a TLS proxy's https://host)

    @classmethod
    def from_name(cls, name: str, **overrides) -> "WebConfig":
        if name not in WEB_PRESETS:
            raise KeyError(f"unknown web preset {name!r}; choose one of {', '.join(WEB_PRESETS)}")
        return replace(WEB_PRESETS[name], **overrides)

    @classmethod
    def from_args(cls, a: argparse.Namespace) -> "WebConfig":
        names = {f.name for f in fields(cls)}
        over = {k: v for k, v in vars(a).items() if k in names and v is not None}
        if "allow_origins" in over:
            over["allow_origins"] = tuple(over["allow_origins"])
        return cls.from_name(getattr(a, "web_preset", None) or "local", **over).validated()

    def validated(self) -> "WebConfig":
        positive = ("max_sessions", "max_frame_bytes", "max_frame_side", "max_upload_bytes", "max_upload_pixels",
                    "max_rate", "idle_timeout", "max_in_flight", "capture_side", "detect_every")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be > 0")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"--port {self.port}: must be in 0..65535")
        if not 30 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality {self.jpeg_quality}: must be in 30..100")
        if self.reframe not in ("fixed", "follow"):
            raise ValueError(f"--reframe {self.reframe!r}: choose fixed or follow")
        if self.token is not None and len(self.token) < 8:
            raise ValueError("--token: use at least 8 characters (e.g. python -c 'import secrets; "
                             "print(secrets.token_urlsafe())')")
        for o in self.allow_origins:
            if not o.startswith(("http://", "https://")):
                raise ValueError(f"--allow-origin {o!r}: give a full origin such as https://gpu.example.org")
        return self

    def bind_warnings(self) -> list[str]:
        """What to tell the user about the bind address (empty for loopback)."""
        if is_loopback(self.host):
            return []
        out = [f"--host {self.host}: the page is reachable from other machines. Browsers allow the camera "
               "only on https:// or localhost pages, so put a TLS proxy in front, or keep the default "
               "127.0.0.1 and use an SSH tunnel (docs/web.md)."]
        if self.token is None:
            out.append("no --token: anyone who can reach this port can use the GPU; pass --token TOKEN")
        return out


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


WEB_PRESETS: dict[str, WebConfig] = {
    # one user on this machine or through an SSH tunnel
    "local": WebConfig(),
    # a GPU server shared by a team behind a TLS proxy: more sessions, shorter idle timeout
    "shared": WebConfig(max_sessions=8, idle_timeout=30.0),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The web server's flags (--host/--port belong to runtime.webcam's parser)."""
    g = p.add_argument_group("web server (--serve)")
    g.add_argument("--web-preset", choices=tuple(WEB_PRESETS), help="limits preset (default local)")
    g.add_argument("--token", help="require ?token=TOKEN on the page URL (use with --host)")
    g.add_argument("--max-sessions", type=int, metavar="N", help="open sessions at once (default 4)")
    g.add_argument("--idle-timeout", type=float, metavar="S", help="close a session idle for S seconds")
    g.add_argument("--max-rate", type=float, metavar="HZ", help="messages per second per page (default 60)")
    g.add_argument("--allow-origin", dest="allow_origins", action="append", metavar="ORIGIN",
                   help="also accept WebSockets from this origin (e.g. your TLS proxy's https://host)")
