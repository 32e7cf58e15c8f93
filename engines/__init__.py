"""ONNX -> TensorRT plans (tensorrt or tensorrt_rtx), the engine cache, the manifest, and the GPU runner.

Modules: build (builder + cache lookup), cache (hashes, build key, sidecar, atomic writes),
manifest (manifest.json schema), inspect_engine (I/O and layer precisions), engine (GPU runtime,
imports torch CUDA), trt_import (flavour choice). CLI: `python -m engines build|inspect`.
Nothing here imports TensorRT at import time.
"""
