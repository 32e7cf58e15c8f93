"""Live webcam runtime: capture, face tracking, the streaming session, presentation, metrics.

Modules, one job each: capture.py (frame sources, latest frame wins), tracking.py (live face
tracking and hints), present.py + hud.py (window / file / virtual camera sinks and the HUD),
metrics.py (latency log), and the GPU session and pipeline loop beside them.
"""
