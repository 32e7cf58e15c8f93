"""CUDA-graph replay of a graph runner, keyed by the addresses of its inputs.

A live session feeds every graph from persistent buffers (its rings, counters, latents, reference
K/V, and the static outputs of the graph before), so each (role, step) sees the same input addresses
on every frame. `GraphReplay` captures one CUDA graph per distinct address signature (S steps give S
graphs) and replays it: no copy of any input, ring caches included, and no Python-side kernel
launches. Contents change in place between replays, which is what a CUDA graph reads.

Outputs are the captured graph's static tensors, overwritten by its next replay (the session
consumes them before). A signature beyond `max_graphs` runs eagerly, with one warning.
On the CPU (no CUDA) it is a pass-through.
"""
from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


class GraphReplay:
    def __init__(self, runner, name: str = "", max_graphs: int = 16, warmup: int = 2):
        self.runner, self.name, self.max_graphs, self.warmup = runner, name, max_graphs, warmup
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, dict]] = {}
        self._seen: dict[tuple, int] = {}
        self._warned = False

    @staticmethod
    def _key(feed: dict) -> tuple:
        return tuple((n, t.data_ptr(), tuple(t.shape), t.dtype) for n, t in feed.items())

    def __call__(self, feed: dict) -> dict:
        first = next(iter(feed.values()))
        if not first.is_cuda:
            return self.runner(feed)
        key = self._key(feed)
        hit = self._graphs.get(key)
        if hit is not None:
            hit[0].replay()
            return hit[1]
        n = self._seen.get(key, 0)
        if n < self.warmup or len(self._graphs) >= self.max_graphs:
            if len(self._graphs) >= self.max_graphs and not self._warned:
                log.warning("%s: more than %d input layouts; running eagerly", self.name, self.max_graphs)
                self._warned = True
            self._seen[key] = n + 1
            return self.runner(feed)  # warm-up runs (allocator, autotuning) before capture
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.current_stream()
        with torch.cuda.graph(graph, stream=None):
            out = self.runner(feed)
        torch.cuda.current_stream().wait_stream(stream)
        self._graphs[key] = (graph, out)
        graph.replay()
        return out
