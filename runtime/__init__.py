"""Streaming inference runtime: backends, stream state, the few-step pipeline."""
