"""python -m engines build|inspect: build TensorRT plans from ONNX, and show what is inside one.

    python -m engines build artifacts/onnx                          # every engine in DIR/manifest.json
    python -m engines build model.onnx --shape x:1x4x64x64,2x4x64x64,4x4x64x64 --out artifacts/engines
    python -m engines build artifacts/onnx --trt tensorrt_rtx --target sm_89 --opt-level 3
    python -m engines inspect artifacts/onnx/denoiser.plan [--json]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from engines import build as B
from engines import inspect_engine, trt_import
from engines.cache import external_data_files
from models.cli import add_debug_flag, run_main
from models.fileio import check_output_folder, check_output_path


def parse_shape(text: str) -> tuple[str, tuple]:
    """'x:1x4x8x8,2x4x8x8,8x4x8x8' -> ('x', (min, opt, max)); one shape means a static profile."""
    name, sep, dims = text.rpartition(":")
    try:
        shapes = [tuple(int(d) for d in s.split("x")) for s in dims.split(",")]
    except ValueError:
        shapes = []
    if not sep or not name or len(shapes) not in (1, 3):
        raise argparse.ArgumentTypeError(f"--shape {text!r}: use NAME:MIN,OPT,MAX like x:1x4x64x64,2x4x64x64,4x4x64x64")
    return name, tuple(shapes * 3 if len(shapes) == 1 else shapes)


def _args(argv):
    p = argparse.ArgumentParser(prog="python -m engines", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build plans from a manifest folder or .onnx files")
    b.add_argument("paths", nargs="+", type=Path, help="folders with manifest.json, or .onnx files")
    b.add_argument("--out", type=Path, help="output folder for .onnx inputs (default: next to each file)")
    b.add_argument("--shape", action="append", type=parse_shape, default=[], metavar="NAME:MIN,OPT,MAX",
                   help="profile for a dynamic input of .onnx inputs (repeat per input)")
    b.add_argument("--only", action="append", default=[], metavar="NAME", help="manifest engines to build")
    b.add_argument("--trt", default="auto", choices=("auto", *trt_import.FLAVOURS))
    b.add_argument("--target", action="append", default=[], choices=B.RTX_TARGETS,
                   help="TensorRT-RTX compute capability (repeat); default: RTX portable set")
    b.add_argument("--workspace-mib", type=int, default=4096)
    b.add_argument("--opt-level", type=int, default=3, choices=range(6))
    b.add_argument("--timing-cache", type=Path, help="full TensorRT timing cache file")
    b.add_argument("--rebuild", default="auto", choices=("auto", "never", "always"))
    b.add_argument("-v", "--verbose", action="store_true")
    add_debug_flag(b)
    i = sub.add_parser("inspect", help="list I/O and layers with precisions")
    i.add_argument("engine", type=Path)
    i.add_argument("--trt", default=None, choices=("auto", *trt_import.FLAVOURS))
    i.add_argument("--json", action="store_true")
    add_debug_flag(i)
    a = p.parse_args(argv)
    if a.cmd == "build" and a.workspace_mib < 1:
        p.error(f"--workspace-mib must be >= 1, got {a.workspace_mib}")
    return a


def _plan_path(a, path: Path) -> Path:
    return (a.out or path.parent) / (path.stem + ".plan")


def _check_paths(a) -> None:
    """Every input exists and every output can be written, before the first (slow) build."""
    for path in a.paths:
        if path.is_dir():
            if a.shape or a.out:
                raise ValueError(f"{path}: --shape/--out apply to .onnx inputs; a manifest carries its own profiles")
            check_output_folder(path, flag="manifest folder")
        elif path.suffix == ".onnx":
            if not path.is_file():
                raise FileNotFoundError(f"{path} does not exist; export it first with `python -m export`")
            external_data_files(path)  # parses the graph (not the weights): a non-ONNX file fails here
            check_output_path(_plan_path(a, path), (".plan",), inputs=a.paths, flag="--out" if a.out else "plan")
        else:
            raise ValueError(f"{path}: not a folder or an .onnx file")
    if a.timing_cache is not None:
        check_output_path(a.timing_cache, None, flag="--timing-cache")


def _build(a) -> None:
    config = B.BuildConfig(flavour=a.trt, targets=tuple(a.target), workspace_mib=a.workspace_mib,
                           opt_level=a.opt_level, timing_cache=a.timing_cache, rebuild=a.rebuild,
                           verbose=a.verbose)
    _check_paths(a)
    for path in a.paths:
        if path.is_dir():
            results = B.build_manifest(path, config, a.only)
        else:
            results = [B.build_engine(path, _plan_path(a, path), dict(a.shape), config)]
        for r in results:
            state = f"built in {r.seconds:.1f}s ({r.reason})" if r.built else "cached"
            print(f"{r.engine}  {state}  [{r.key.builder} {r.key.builder_version} {','.join(r.key.targets)}]")


def _main(argv=None) -> int:
    a = _args(argv)
    logging.basicConfig(level=logging.INFO if getattr(a, "verbose", False) else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if a.cmd == "build":
        _build(a)
    else:
        report = inspect_engine.inspect(a.engine, a.trt)
        print(json.dumps(report, indent=1) if a.json else inspect_engine.format_report(report))
    return 0


def main(argv=None) -> int:
    """Exit codes: models/cli.py (0 ok, 1 bad input, 2 usage, 3 internal, 130/143 interrupted)."""
    from engines.cache import EngineCacheError
    return run_main(_main, argv, expected=(B.BuildError, EngineCacheError))


if __name__ == "__main__":
    sys.exit(main())
