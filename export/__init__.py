"""torch -> ONNX export of X-Portrait, one graph per cache rate (docs/export.md).

`python -m export --preset tiny --out DIR` is the entry point. The pieces: `spec.ExportSpec` (what a
graph is), `specs.build_specs` (one entry per graph), `wrappers` (flat tensor I/O), `to_onnx` (the
one trace/cleanup/fp16/save path).
"""
