"""Decode steps replayed from captured CUDA graphs.

On a GPU a decode step of a small model is bound by launching kernels, not by running them: 30
layers of ~15 operations each, every one launched from Python. vLLM and SGLang capture the decode
forward once per batch size as a CUDA graph and replay it, one launch per step; so do we:

- a graph has fixed shapes: rows padded up to a bucket (ROW_BUCKETS), block tables padded to a
  power of two of blocks (up to the context's), so a step of n rows whose longest sequence holds
  w blocks replays the graph of (bucket(n), bucket(w));
- the graph reads its inputs from static buffers (token ids, positions, the slots its keys and
  values go to, block tables, lengths); a step copies its own into them, replays, and takes the
  first n rows of the logits, which every graph writes into one buffer they share (a graph's
  own memory is its small input buffers; its intermediates live in the shared pool);
- padding rows decode token 0 at position 0 into the cache's scratch block and attend to that
  one slot; their logits are dropped;
- attention is `attention.paged_decode`, which the eager path also runs for GPU decode rows.

Graphs are captured when a shape is first needed (a one-time pause of that step), into one shared
memory pool. Run eagerly instead: steps with prompt chunks or drafts; decode steps beyond the
largest bucket, or whose padded keys and values would take more than GRAPH_MAX_GATHER_BYTES per
layer (paged_decode gathers them: every row as long as the longest, which the eager path avoids
by grouping rows by length); and every step after a capture failed (logged).

On a CPU there is nothing to capture: `Rerun` runs the same function over the same static
buffers, which is how the tests check the padding, the buckets and the buffers' reuse.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Callable

import torch

from serve_app.engine.attention import DecodeRows
from serve_app.engine.kv_cache import KVCache

logger = logging.getLogger(__name__)

ROW_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
GRAPH_MAX_GATHER_BYTES = 512 << 20  # one layer's gathered keys + values in a graph, padded

# (cache, ids, positions, slots, tables, lens) -> logits [rows, vocab]; shapes from rows and tables only
DecodeForward = Callable[[KVCache, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
                         torch.Tensor]


class Rerun:
    """A stand-in for a CUDA graph where there is none: replay runs the function again."""

    def __init__(self, fn: Callable[[], torch.Tensor]):
        self.fn = fn
        fn()

    def pool(self):
        return None

    def replay(self) -> None:
        self.fn()


class CudaGraph:
    """`fn` captured once; replay launches everything it launched, on the same buffers."""

    def __init__(self, fn: Callable[[], torch.Tensor], pool):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()  # once outside the capture: lazy initialisations (cuBLAS workspaces, kernel choices)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: only this thread must stay off unsafe CUDA calls while capturing (the
        # replica's other threads never launch work, but may query the device)
        with torch.cuda.graph(self.graph, pool=pool, capture_error_mode="thread_local"):
            fn()

    def pool(self):
        return self.graph.pool()

    def replay(self) -> None:
        self.graph.replay()


def bucket(n: int, sizes: tuple[int, ...]) -> int:
    return sizes[bisect.bisect_left(sizes, n)]


class StaticDecode:
    """One graph and the buffers it reads: `rows` rows over tables of `blocks` blocks."""

    def __init__(self, forward: DecodeForward, cache: KVCache, logits: torch.Tensor, blocks: int, capture: bool,
                 pool):
        """logits: [rows, vocab], where the graph leaves its logits."""
        device = cache.keys[0].device
        rows = logits.shape[0]
        self.cache = cache
        self.logits = logits
        self.ids = torch.zeros(rows, dtype=torch.long, device=device)
        self.positions = torch.zeros(rows, dtype=torch.long, device=device)
        self.slots = torch.zeros(rows, dtype=torch.long, device=device)
        self.tables = torch.zeros(rows, blocks, dtype=torch.long, device=device)
        self.lens = torch.ones(rows, dtype=torch.long, device=device)
        self._pad(0)  # every row a padding row while capturing: only the scratch block is written
        run = lambda: logits.copy_(forward(cache, self.ids, self.positions, self.slots, self.tables, self.lens))
        self.graph = CudaGraph(run, pool) if capture else Rerun(run)

    def pool(self):
        """The memory pool the graph was captured into (the next capture shares it)."""
        return self.graph.pool()

    def _pad(self, used: int) -> None:
        """Rows from `used` on decode token 0 at position 0 into the scratch block's first slot."""
        cache = self.cache
        self.ids[used:] = 0
        self.positions[used:] = 0
        self.slots[used:] = cache.scratch_block * cache.block_size
        self.tables[used:] = cache.pad_block
        self.tables[used:, 0] = cache.scratch_block
        self.lens[used:] = 1

    def __call__(self, ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                 seg: DecodeRows) -> torch.Tensor:
        n, width = seg.block_tables.shape
        self.ids[:n] = ids
        self.positions[:n] = positions
        self.slots[:n] = slots
        self.tables[:n, :width] = seg.block_tables  # columns past a row's length are masked, whatever they hold
        self.lens[:n] = seg.lens
        self._pad(n)
        self.graph.replay()
        return self.logits[:n].clone()  # the next replay overwrites them


class DecodeGraphs:
    """The captured decode steps of one model runner over one KV cache."""

    def __init__(self, forward: DecodeForward, max_rows: int, max_model_len: int, vocab: int, capture: bool):
        self.forward = forward
        self.vocab = vocab
        self.max_model_len = max_model_len
        self.capture = capture  # False: Rerun (CPU, tests)
        self.row_buckets = ROW_BUCKETS[:bisect.bisect_left(ROW_BUCKETS, min(max_rows, ROW_BUCKETS[-1])) + 1]
        self.graphs: dict[tuple[int, int], StaticDecode] = {}
        self.failed = False  # a capture failed: every step runs eagerly from then on
        self.cache: KVCache | None = None
        self.logits: torch.Tensor | None = None  # [largest bucket, vocab] float32, shared by the graphs
        self.pool = None

    def shape(self, step) -> tuple[int, int] | None:
        """(rows, blocks) of the graph for this step, or None when it runs eagerly: not a decode
        step (one token per row, nothing else), too many rows, or too large a gather."""
        segments = step.layout.segments
        if self.failed or len(segments) != 1 or not isinstance(segments[0], DecodeRows):
            return None
        seg, cache = segments[0], step.layout.cache
        if seg.size != len(step.input_ids) or seg.size > self.row_buckets[-1]:
            return None
        blocks = min(1 << (seg.block_tables.shape[1] - 1).bit_length(), cache.blocks_for(self.max_model_len))
        rows = bucket(seg.size, self.row_buckets)
        keys = cache.keys[0]
        gathered = 2 * rows * blocks * keys[0].numel() * keys.element_size()
        return (rows, blocks) if gathered <= GRAPH_MAX_GATHER_BYTES else None

    def __call__(self, step, shape: tuple[int, int]) -> torch.Tensor | None:
        """Logits [rows, vocab] of a decode step through the graph of `shape` (from `shape()`);
        None if that graph could not be captured (the step then runs eagerly)."""
        seg: DecodeRows = step.layout.segments[0]
        cache = step.layout.cache
        if cache is not self.cache:  # a new cache: graphs hold the old one's tensors
            self.cache, self.graphs, self.pool = cache, {}, None
            self.logits = torch.empty(self.row_buckets[-1], self.vocab, device=cache.keys[0].device)
        graph = self.graphs.get(shape)
        if graph is None:
            rows, blocks = shape
            try:
                graph = StaticDecode(self.forward, cache, self.logits[:rows], blocks, self.capture, self.pool)
            except Exception:  # e.g. out of memory: serve on without graphs rather than fail every step
                logger.exception("capturing a decode graph (%d rows, %d blocks) failed; decode steps run eagerly",
                                 rows, blocks)
                self.failed = True
                return None
            self.graphs[shape] = graph
            self.pool = graph.pool()
            if self.capture:
                logger.info("captured a decode graph: %d rows, %d blocks (%d graphs)", rows, blocks,
                            len(self.graphs))
        return graph(step.input_ids, step.positions, step.layout.write_slots, seg)
