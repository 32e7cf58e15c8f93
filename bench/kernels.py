"""Kernel micro-benchmarks: the Triton kernels vs torch SDPA and vs their plain-PyTorch references.

    python -m bench.kernels                      # both kernels, fp16 + bf16, SD1.5 shapes
    python -m bench.kernels --only motion --dtypes fp16 --json artifacts/bench/kernels.json

Reference attention: 8 heads, D = 40/80/160 at N = M = 4096/1024/256/64 tokens, B frames sharing one
reference bank (Br = 1). Baselines: torch SDPA (flash, efficient) on the explicit concatenation
[k; k_ref] (the concatenation is part of the baseline's cost), and kernels.reference_attention.reference.

Motion attention: 8 heads, C = 320/640/1280 at 64²/32²/16²/8² positions × streams, full ring (L = 16,
n_past = 15). Baselines: gather the ring + positional tables and run SDPA with one query per row, and
kernels.motion_attention.reference. Both include the ring write.

Timing: triton.testing.do_bench (CUDA events, warm-up, L2 flushed before each rep), median and p10/p90
in ms. Each configuration is checked against the reference before it is timed. Needs a CUDA GPU; run
it as a module from the repo root (as a file, bench/kernels.py would shadow the `kernels` package).
"""

import argparse
import json
import math
import sys

import torch

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
HEADS = 8
# (spatial positions N = H*W, channels C) of SD1.5's attention levels; D = C / 8.
LEVELS = [(4096, 320), (1024, 640), (256, 1280), (64, 1280)]
RA_EXTRA = [(4096, 640)]                  # N = M = 4096 at D = 80: the second target shape of issue 9
MOTION_EXTRA = [(4096, 640), (1024, 1280)]  # the up blocks' motion layers (2 each in SD1.5)
GRAPH_BELOW_MS = 0.5  # eager medians under this also get CUDA-graph timing (launch overhead matters there)


def _sdpa_backends():
    from torch.nn.attention import SDPBackend

    backends = {"sdpa_flash": SDPBackend.FLASH_ATTENTION, "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION}
    if hasattr(SDPBackend, "CUDNN_ATTENTION"):  # usually the strongest on Hopper
        backends["sdpa_cudnn"] = SDPBackend.CUDNN_ATTENTION
    return backends


def _time(fn, warmup_ms: int, rep_ms: int):
    """(p50, p10, p90) in ms."""
    import triton.testing

    return tuple(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.1, 0.9]))


def _time_graph(fn, reps: int = 25, inner: int = 10) -> float:
    """Median ms per call of fn replayed from a CUDA graph (no launch gaps), L2 flushed before every call.

    Graph A holds `inner` x (flush, fn), graph B `inner` x (flush) alone: (A - B) / inner. The flush writes
    256 MB, several times the L2 of any current GPU, as triton.testing.do_bench does between calls."""
    import statistics

    flush = torch.empty(64 * 2**20, dtype=torch.int32, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture (allocator, compilation)
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graphs = [torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()]
    for g, with_fn in zip(graphs, (True, False)):
        with torch.cuda.graph(g):
            for _ in range(inner):
                flush.zero_()
                if with_fn:
                    fn()

    def median_ms(g) -> float:
        ms = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            g.replay()
            end.record()
            end.synchronize()
            ms.append(start.elapsed_time(end))
        return statistics.median(ms)

    return max(median_ms(graphs[0]) - median_ms(graphs[1]), 0.0) / inner


def _rel_err(out, ref) -> float:
    return ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def bench_reference_attention(dtype, batch: int, warmup_ms: int, rep_ms: int, device="cuda") -> list[dict]:
    from torch.nn.attention import sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    from kernels import reference_attention as ra

    rows = []
    for n, c in LEVELS + RA_EXTRA:
        m, d = n, c // HEADS
        q, k, v = (torch.randn(batch, n, c, device=device, dtype=dtype) for _ in range(3))
        k_ref, v_ref = (torch.randn(1, m, c, device=device, dtype=dtype) for _ in range(2))

        def heads_first(t):  # (B, T, C) -> (B, heads, T, D), a view
            return t.unflatten(-1, (HEADS, d)).transpose(1, 2)

        def sdpa_on_concat(backend):
            def run():
                kk = torch.cat([k, k_ref.expand(batch, -1, -1)], dim=1)
                vv = torch.cat([v, v_ref.expand(batch, -1, -1)], dim=1)
                with sdpa_kernel(backend):
                    o = sdpa(heads_first(q), heads_first(kk), heads_first(vv))
                return o.transpose(1, 2).reshape(batch, n, c)
            return run

        providers = {"triton": lambda: ra.reference_attention(q, k, v, k_ref, v_ref, HEADS)}
        providers.update({name: sdpa_on_concat(b) for name, b in _sdpa_backends().items()})
        providers["reference"] = lambda: ra.reference(q, k, v, k_ref, v_ref, HEADS)

        truth = ra.reference(*(t.float() for t in (q, k, v, k_ref, v_ref)), HEADS)
        shape = f"B={batch} N={n} M={m} C={c} D={d}"
        rows += _measure("reference_attention", dtype, shape, providers, truth, ra.flops(batch, n, n, m, c),
                         None, warmup_ms, rep_ms)
    return rows


def bench_motion_attention(dtype, streams: int, warmup_ms: int, rep_ms: int, device="cuda") -> list[dict]:
    from torch.nn.attention import sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    from kernels import motion_attention as ma

    L, P, n_past_val, ws_val = 16, 24, 15, 7
    rows = []
    for n, c in LEVELS + MOTION_EXTRA:
        r, d = streams * n, c // HEADS
        q, k_new, v_new = (torch.randn(r, c, device=device, dtype=dtype) for _ in range(3))
        k_cache, v_cache = (torch.randn(L, r, c, device=device, dtype=dtype) for _ in range(2))
        pe_k, pe_v = (torch.randn(P, c, device=device, dtype=dtype) for _ in range(2))
        ws = torch.tensor([ws_val], dtype=torch.int32, device=device)
        n_past = torch.tensor([n_past_val], dtype=torch.int32, device=device)
        args = (q, k_new, v_new, k_cache, v_cache, pe_k, pe_v, ws, n_past)
        # Static gather indices, as a CUDA-graph-friendly torch path would precompute them.
        j = torch.arange(n_past_val + 1, device=device)
        slots, pos = (ws_val - j) % L, n_past_val - j

        def sdpa_on_gather(backend):
            def run():
                k_cache[ws_val] = k_new
                v_cache[ws_val] = v_new
                kk = (k_cache[slots] + pe_k[pos][:, None]).view(-1, r, HEADS, d).permute(1, 2, 0, 3)
                vv = (v_cache[slots] + pe_v[pos][:, None]).view(-1, r, HEADS, d).permute(1, 2, 0, 3)
                with sdpa_kernel(backend):
                    o = sdpa(q.view(r, HEADS, 1, d), kk, vv)  # (R, heads, 1, D)
                return o.reshape(r, c)
            return run

        providers = {"triton": lambda: ma.motion_attention(*args, HEADS)}
        providers.update({name: sdpa_on_gather(b) for name, b in _sdpa_backends().items()})
        providers["reference"] = lambda: ma.reference(*args, HEADS)

        truth = ma.reference(*(t.float() if t.is_floating_point() else t for t in args), HEADS)
        frames = n_past_val + 1
        shape = f"R={streams}x{n} C={c} D={d} L={L}"
        rows += _measure("motion_attention", dtype, shape, providers, truth, 4.0 * r * c * frames,
                         ma.bytes_moved(r, c, frames, q.element_size()), warmup_ms, rep_ms)
    return rows


SWEEP = [(64, 32, 4, 2), (64, 64, 4, 2), (128, 32, 4, 3), (128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 2),
         (128, 128, 8, 3), (128, 64, 8, 2), (64, 64, 8, 3)]  # (BLOCK_M, BLOCK_N, warps, stages)


def sweep_reference_attention(dtype, batch: int, warmup_ms: int, rep_ms: int, device="cuda") -> list[dict]:
    """Time the fused kernel with each SWEEP config that fits the device's shared memory (smem_estimate), at
    N = M = 4096, D = 40 and 80, and at the D = 160 level: which config should the heuristic pick?"""
    from kernels import reference_attention as ra

    limit = ra._device_smem(torch.device(device)) or 99 * 1024
    rows = []
    for n, c in [(4096, 320), (4096, 640), (256, 1280)]:
        d = c // HEADS
        d0, d1 = ra.split_head_dim(d)
        q, k, v = (torch.randn(batch, n, c, device=device, dtype=dtype) for _ in range(3))
        k_ref, v_ref = (torch.randn(1, n, c, device=device, dtype=dtype) for _ in range(2))
        truth = ra.reference(*(t.float() for t in (q, k, v, k_ref, v_ref)), HEADS)
        providers = {}
        for bm, bn, w, st in SWEEP:
            cfg = dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=st)
            if ra.smem_estimate(cfg, d0 + d1, q.element_size()) <= limit:
                providers[f"cfg{bm}x{bn}w{w}s{st}"] = (lambda cfg=cfg: ra._launch(
                    q, k, v, k_ref, v_ref, HEADS, d**-0.5, torch.empty_like(q), config=cfg))
        shape = f"B={batch} N={n} M={n} C={c} D={d} sweep"
        rows += _measure("reference_attention", dtype, shape, providers, truth, ra.flops(batch, n, n, n, c),
                         None, warmup_ms, rep_ms)
    return rows


def _measure(kernel, dtype, shape, providers, truth, flop, nbytes, warmup_ms, rep_ms) -> list[dict]:
    """Check every provider against the fp32 reference output, then time it."""
    rows, triton_ms, triton_graph = [], None, None
    for name, fn in providers.items():
        row = dict(kernel=kernel, dtype=str(dtype).removeprefix("torch."), shape=shape, provider=name,
                   ms_p50=None, ms_p10=None, ms_p90=None, tflops=None, gbps=None, triton_speedup=None,
                   rel_err=None, skipped=None, ms_graph=None, triton_speedup_graph=None)
        rows.append(row)
        try:
            row["rel_err"] = _rel_err(fn(), truth)
        except RuntimeError as e:  # e.g. an SDPA backend without a kernel for this head dim / dtype / GPU
            row["skipped"] = str(e).splitlines()[0][:80]
            continue
        p50, p10, p90 = _time(fn, warmup_ms, rep_ms)
        row.update(ms_p50=p50, ms_p10=p10, ms_p90=p90, tflops=flop / (p50 * 1e-3) / 1e12)
        if nbytes is not None:
            row["gbps"] = nbytes / (p50 * 1e-3) / 1e9
        if truth.is_cuda and p50 < GRAPH_BELOW_MS:
            try:
                row["ms_graph"] = _time_graph(fn)
            except RuntimeError as e:  # not capturable (e.g. a backend that syncs)
                row["skipped"] = f"graph timing: {str(e).splitlines()[0][:60]}"
        if name == "triton":
            triton_ms, triton_graph = p50, row["ms_graph"]
        elif triton_ms is not None:
            row["triton_speedup"] = p50 / triton_ms  # > 1: the Triton kernel is faster
            if triton_graph and row["ms_graph"]:
                row["triton_speedup_graph"] = row["ms_graph"] / triton_graph
    return rows


def _fmt(x, spec):
    width = spec.split(".")[0]
    return format("-", f">{width}") if x is None or math.isnan(x) else format(x, spec)


def print_table(rows: list[dict]) -> None:
    head = f"{'kernel':<20} {'dtype':<9} {'shape':<30} {'provider':<15} {'p50 ms':>8} {'p10':>8} {'p90':>8} " \
           f"{'TFLOP/s':>8} {'GB/s':>7} {'triton x':>8} {'graph ms':>8} {'graph x':>7} {'rel err':>8}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['kernel']:<20} {r['dtype']:<9} {r['shape']:<30} {r['provider']:<15} "
              f"{_fmt(r['ms_p50'], '8.4f')} {_fmt(r['ms_p10'], '8.4f')} {_fmt(r['ms_p90'], '8.4f')} "
              f"{_fmt(r['tflops'], '8.2f')} {_fmt(r['gbps'], '7.0f')} {_fmt(r['triton_speedup'], '8.2f')} "
              f"{_fmt(r.get('ms_graph'), '8.4f')} {_fmt(r.get('triton_speedup_graph'), '7.2f')} "
              f"{_fmt(r['rel_err'], '8.1e')}" + (f"  skipped: {r['skipped']}" if r["skipped"] else ""))


class BenchUnavailable(RuntimeError):
    """The benchmark cannot run here (no CUDA GPU, no Triton); the message says what is needed."""


def _main(argv=None) -> int:
    from models.cli import add_debug_flag
    from models.fileio import check_output_path

    ap = argparse.ArgumentParser(prog="python -m bench.kernels", description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=["reference", "motion"], help="benchmark one kernel only")
    ap.add_argument("--dtypes", nargs="+", default=["fp16", "bf16"], choices=list(DTYPES))
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4],
                    help="frames per reference-attention call (1 = the live case)")
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 4],
                    help="streams per motion-attention call (rows = streams x H x W; 1 = the live case)")
    ap.add_argument("--sweep", action="store_true", help="also time candidate launch configs of reference attention")
    ap.add_argument("--warmup-ms", type=int, default=25)
    ap.add_argument("--rep-ms", type=int, default=100)
    ap.add_argument("--json", metavar="PATH", help="also write the rows and the environment as JSON")
    add_debug_flag(ap)
    args = ap.parse_args(argv)
    if args.json:
        check_output_path(args.json, (".json",), flag="--json")

    if not torch.cuda.is_available():
        raise BenchUnavailable("bench.kernels: no CUDA GPU visible; these benchmarks time CUDA kernels and cannot "
                               "run on CPU. Run on a machine with an NVIDIA GPU (the kernels' correctness tests "
                               "run on CPU: pytest tests/test_kernels.py)")
    try:
        import triton
    except ImportError:
        raise BenchUnavailable("bench.kernels: Triton is not installed (pip install the gpu extra: triton)") from None

    torch.manual_seed(0)
    rows = []
    for name in args.dtypes:
        if args.only in (None, "reference"):
            for b in args.batch:
                rows += bench_reference_attention(DTYPES[name], b, args.warmup_ms, args.rep_ms)
            if args.sweep and name != "fp32":
                rows += sweep_reference_attention(DTYPES[name], max(args.batch), args.warmup_ms, args.rep_ms)
        if args.only in (None, "motion"):
            for st in args.streams:
                rows += bench_motion_attention(DTYPES[name], st, args.warmup_ms, args.rep_ms)
    env = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
               cuda=torch.version.cuda)
    print(f"# {env}")
    print_table(rows)
    if args.json:
        from models.fileio import atomic_write

        atomic_write(args.json, json.dumps(dict(env=env, rows=rows), indent=1))
        print(f"# wrote {args.json}")
    return 0


def main(argv=None) -> int:
    """Exit codes (models/cli.py): 0 ok, 1 cannot run here (no GPU/Triton) or bad --json path, 2 usage,
    3 internal error, 130/143 interrupted."""
    from models.cli import run_main

    return run_main(_main, argv, expected=(BenchUnavailable,))


if __name__ == "__main__":
    if not __package__:
        sys.exit("run this as a module from the repo root: python -m bench.kernels "
                 "(as a file, bench/kernels.py would be imported in place of the kernels package)")
    sys.exit(main())
