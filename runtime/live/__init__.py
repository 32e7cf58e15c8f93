"""Live webcam runtime: capture, face tracking, the streaming session, presentation, metrics.

Modules, one job each: capture.py (frame sources, latest frame wins), tracking.py (live face
tracking and hints), present.py + hud.py (window / file / virtual camera sinks and the HUD),
metrics.py (latency log), and the GPU session and pipeline loop beside them.
"""

__all__ = ["LiveConfig", "LIVE_PRESETS", "load_live", "LiveModel", "LiveSession"]


def __getattr__(name: str):
    """`from runtime.live import LiveConfig, load_live`, without importing torch for the light stages."""
    if name in ("LiveConfig", "LIVE_PRESETS"):
        from runtime.live import config
        return getattr(config, name)
    if name in ("load_live", "LiveModel"):
        from runtime.live import factory
        return getattr(factory, name)
    if name == "LiveSession":
        from runtime.live.session import LiveSession
        return LiveSession
    raise AttributeError(f"module 'runtime.live' has no attribute {name!r}")
