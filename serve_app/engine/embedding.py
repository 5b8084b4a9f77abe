"""Embedding models: pooling as the model's sentence-transformers config declares it, and a
batcher that runs them on one worker thread. Plain Python + torch, no Ray.

- `read_spec` learns what serving a model needs from its files alone (no weights): pooling,
  normalization, output dimension, input length limit, Matryoshka dimensions.
  A sentence-transformers folder declares its modules in `modules.json` (Transformer, then
  `1_Pooling/config.json`, then optionally Normalize); without one, an encoder is mean-pooled
  (what sentence-transformers does for a plain model) and a causal LM embeds as its last token,
  L2-normalized (the convention of decoder embedding models).
- `EmbeddingModel` loads the weights with `AutoModel.from_pretrained`, the same path as any hub
  id, and turns token-id lists into vectors.
- `EmbeddingEngine` batches by tokens: every input that waits is sorted by length and cut into
  micro-batches whose padded size stays within a token budget, so short and long inputs do not
  pad each other. It runs on one worker thread, which also loads the model (see AsyncEngine's
  docstring for why the thread that computes must be the one that loaded).
"""

from __future__ import annotations

import asyncio
import json
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from serve_app.engine.builtin_models import resolve_model_path

logger = logging.getLogger(__name__)

POOLING_MODES = ("mean", "cls", "max", "lasttoken", "mean_sqrt_len_tokens", "weightedmean")
# sentence-transformers' legacy boolean keys of 1_Pooling/config.json.
_LEGACY_POOLING_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
_DECODER_SUFFIXES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")


@dataclass(frozen=True)
class EmbeddingSpec:
    """How a model turns token ids into one vector, and the limits a request is checked against."""

    pooling: str  # one of POOLING_MODES
    normalize: bool  # L2-normalize the pooled vector
    dimensions: int  # length of the vector
    max_model_len: int  # most tokens of one input
    vocab_size: int
    lowercase: bool = False  # sentence-transformers' do_lower_case: texts are lowercased before tokenizing
    # Matryoshka: None = the vector cannot be shortened; () = to any length; else to one of these.
    matryoshka_dimensions: tuple[int, ...] | None = None

    def check_dimensions(self, dimensions: int) -> str | None:
        """Why `dimensions` cannot be served, or None when it can."""
        if dimensions == self.dimensions:
            return None
        if self.matryoshka_dimensions is None:
            return (f"this model does not support shortening its {self.dimensions}-dimensional embeddings "
                    "(it was not trained for Matryoshka representations); omit 'dimensions' or pass "
                    f"{self.dimensions}")
        if not 1 <= dimensions <= self.dimensions:
            return f"'dimensions' must lie in 1..{self.dimensions} for this model"
        if self.matryoshka_dimensions and dimensions not in self.matryoshka_dimensions:
            return ("this model was trained for these dimensions only: "
                    + ", ".join(map(str, self.matryoshka_dimensions)))
        return None


def _read_json(path: str, name: str) -> dict | list | None:
    """A JSON file of a local folder or a hub repository (None when it has none)."""
    folder = Path(path)
    if folder.is_dir():
        file = folder / name
        return json.loads(file.read_text()) if file.is_file() else None
    from transformers.utils import cached_file

    resolved = cached_file(path, name, _raise_exceptions_for_missing_entries=False,
                           _raise_exceptions_for_connection_errors=False)
    return json.loads(Path(resolved).read_text()) if resolved else None


def is_decoder(model_config) -> bool:
    return any(a.endswith(_DECODER_SUFFIXES) for a in (getattr(model_config, "architectures", None) or []))


def detect_task(model: str) -> str:
    """'embed' or 'generate' for a hub id, local folder or built-in name, from its files."""
    from transformers import AutoConfig

    from serve_app.engine.builtin_models import builtin_task

    task = builtin_task(model)
    if task is not None:
        return task
    if _read_json(model, "modules.json") is not None:
        return "embed"  # a sentence-transformers model
    config = AutoConfig.from_pretrained(model)
    if is_decoder(config):
        return "generate"
    architectures = getattr(config, "architectures", None) or []
    if any(a.endswith(("Model", "ForMaskedLM")) for a in architectures):
        return "embed"  # a bare encoder (BertModel, XLMRobertaModel, ...)
    raise ValueError(f"cannot tell whether {model!r} generates or embeds (architectures {architectures}); "
                     "set `task: generate` or `task: embed` for it")


def _pooling_of(config: dict) -> str:
    mode = config.get("pooling_mode")
    if mode is None:
        modes = [m for key, m in _LEGACY_POOLING_KEYS.items() if config.get(key)]
        mode = modes if len(modes) != 1 else modes[0]
        if not modes:
            mode = "mean"
    if isinstance(mode, list | tuple):
        if len(mode) != 1:
            raise ValueError(f"pooling modes {list(mode)} combined: only one pooling mode is supported")
        mode = mode[0]
    if mode not in POOLING_MODES:
        raise ValueError(f"pooling mode {mode!r} is not supported ({', '.join(POOLING_MODES)})")
    if config.get("include_prompt") is False:
        raise ValueError("pooling with include_prompt: false (instruction models) is not supported")
    return mode


def read_spec(model: str, max_model_len: int | None = None, tokenizer=None) -> EmbeddingSpec:
    """What serving `model` as an embedding model needs, from its config files alone."""
    from transformers import AutoConfig, AutoTokenizer

    path = resolve_model_path(model)
    config = AutoConfig.from_pretrained(path)
    hidden = int(config.hidden_size)
    modules = _read_json(path, "modules.json")
    st_config = _read_json(path, "sentence_bert_config.json") or {}
    if modules is not None:
        kinds = [m["type"].rsplit(".", 1)[-1] for m in modules]
        unsupported = [k for k in kinds if k not in ("Transformer", "Pooling", "Normalize")]
        if unsupported or kinds[:2] != ["Transformer", "Pooling"]:
            raise ValueError(f"{model}: sentence-transformers modules {kinds} are not supported (a Transformer, "
                             "a Pooling and an optional Normalize are)")
        pooling_dir = next(m["path"] for m in modules if m["type"].endswith("Pooling"))
        pooling_config = _read_json(path, f"{pooling_dir}/config.json") or {}
        pooling = _pooling_of(pooling_config)
        normalize = "Normalize" in kinds
        dimensions = int(pooling_config.get("embedding_dimension")
                         or pooling_config.get("word_embedding_dimension") or hidden)
    elif is_decoder(config):
        pooling, normalize, dimensions = "lasttoken", True, hidden
    else:
        pooling, normalize, dimensions = "mean", False, hidden
    tokenizer = tokenizer or AutoTokenizer.from_pretrained(path)
    length = max_model_len or st_config.get("max_seq_length")
    if not length:
        positions = getattr(config, "max_position_embeddings", None) or 1 << 20
        tokenizer_max = tokenizer.model_max_length if tokenizer.model_max_length < 1 << 30 else positions
        length = min(positions, tokenizer_max)
    # vLLM's convention for Matryoshka models: config.json says so.
    matryoshka = getattr(config, "matryoshka_dimensions", None)
    if matryoshka:
        matryoshka = tuple(int(d) for d in matryoshka)
    elif getattr(config, "is_matryoshka", False):
        matryoshka = ()
    else:
        matryoshka = None
    return EmbeddingSpec(pooling=pooling, normalize=normalize, dimensions=dimensions, max_model_len=int(length),
                         vocab_size=max(int(getattr(config, "vocab_size", 0) or 0), len(tokenizer)),
                         lowercase=bool(st_config.get("do_lower_case", False)), matryoshka_dimensions=matryoshka)


def pool(hidden: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """[rows, tokens, dim] hidden states, right-padded ([rows, tokens] mask) -> [rows, dim] float32,
    as sentence-transformers' Pooling computes each mode."""
    hidden = hidden.float()
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    if mode == "cls":
        return hidden[:, 0]
    if mode == "lasttoken":
        last = mask.sum(dim=1) - 1
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    if mode == "max":
        return hidden.masked_fill(weights == 0, float("-inf")).max(dim=1).values
    if mode == "weightedmean":
        weights = weights * torch.arange(1, hidden.shape[1] + 1, device=hidden.device, dtype=hidden.dtype).view(1, -1, 1)
    total = (hidden * weights).sum(dim=1)
    count = weights.sum(dim=1).clamp(min=1e-9)
    return total / (count.sqrt() if mode == "mean_sqrt_len_tokens" else count)


class EmbeddingModel:
    """Weights plus pooling: token-id lists in, float32 vectors out."""

    def __init__(self, model, spec: EmbeddingSpec, pad_token_id: int = 0):
        self.model = model
        self.spec = spec
        self.pad_token_id = pad_token_id
        self.device = next(model.parameters()).device
        # A causal LM's forward would build a KV cache nobody reads.
        self._extra = {"use_cache": False} if is_decoder(model.config) else {}

    @classmethod
    def load(cls, model: str, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
             max_model_len: int | None = None) -> "EmbeddingModel":
        from transformers import AutoModel, AutoTokenizer

        path = resolve_model_path(model)
        tokenizer = AutoTokenizer.from_pretrained(path)
        spec = read_spec(model, max_model_len, tokenizer)
        weights = AutoModel.from_pretrained(path, dtype=dtype).to(device).eval()
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        return cls(weights, spec, pad)

    @torch.inference_mode()
    def embed(self, inputs: list[list[int]]) -> np.ndarray:
        """One forward over these inputs, right-padded to the longest: [len(inputs), dimensions]."""
        width = max(len(ids) for ids in inputs)
        ids = torch.full((len(inputs), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(inputs), width), dtype=torch.long)
        for row, tokens in enumerate(inputs):
            ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            mask[row, : len(tokens)] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        hidden = self.model(input_ids=ids, attention_mask=mask, **self._extra).last_hidden_state
        vectors = pool(hidden, mask, self.spec.pooling)
        if self.spec.normalize:
            vectors = torch.nn.functional.normalize(vectors, p=2, dim=1)
        return vectors.cpu().numpy()


def micro_batches(lengths: list[int], token_budget: int) -> list[list[int]]:
    """Indices of inputs grouped shortest first, each group's padded size (rows x longest)
    within `token_budget`; an input longer than the budget goes alone."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        if current and (len(current) + 1) * lengths[i] > token_budget:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


@dataclass(eq=False)
class _Job:
    inputs: list[list[int]]
    future: Future
    out: np.ndarray | None = None
    remaining: int = 0
    abandoned: bool = False  # the caller left: skip what has not run yet


@dataclass
class EmbeddingStats:
    forwards: int = 0
    inputs: int = 0
    tokens: int = 0  # real tokens embedded
    padded_tokens: int = 0  # tokens computed, padding included
    seconds: float = 0.0  # in forwards
    # (padded tokens, rows, seconds) of recent forwards, drained by whoever exports metrics.
    log: deque = field(default_factory=lambda: deque(maxlen=10_000))


class EmbeddingEngine:
    """Embeds on one worker thread, batching whatever waits by tokens.

    `build` makes the EmbeddingModel on that thread. Each round takes every job that is
    waiting, sorts all their inputs by length and runs them in micro-batches of at most
    `token_budget` padded tokens; a job's future is resolved once its last input is done.
    Jobs arriving meanwhile wait for the next round; a cancelled job's inputs are skipped.
    """

    def __init__(self, build: Callable[[], EmbeddingModel] | EmbeddingModel, token_budget: int = 8192):
        self.token_budget = token_budget
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._torch_threads = torch.get_num_threads()  # see AsyncEngine: a new thread must set its own
        self.stats = EmbeddingStats()
        self.in_flight = 0  # inputs submitted and not finished (read by autoscaling and stats)
        self._lock = threading.Lock()
        self.model: EmbeddingModel | None = build if isinstance(build, EmbeddingModel) else None
        self._build_error: BaseException | None = None
        self._stopped = False
        built = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(build, built), name="embedding", daemon=True)
        self._thread.start()
        built.wait()
        if self._build_error is not None:
            raise self._build_error

    @property
    def spec(self) -> EmbeddingSpec:
        return self.model.spec

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def submit(self, inputs: list[list[int]]) -> Future:
        """Embed these token-id lists; the future's result is a [len(inputs), dimensions] array.
        Cancelling the future before its round starts skips its inputs."""
        return self._submit(inputs).future

    def _submit(self, inputs: list[list[int]]) -> _Job:
        if not inputs or any(not ids for ids in inputs):
            raise ValueError("every input needs at least one token")
        job = _Job(inputs, Future(), remaining=len(inputs))
        with self._lock:
            self.in_flight += len(inputs)
        self._jobs.put(job)
        return job

    async def embed(self, inputs: list[list[int]]) -> np.ndarray:
        """Embed for asyncio callers; a caller cancelled mid-round skips its inputs not yet run."""
        job = self._submit(inputs)
        try:
            return await asyncio.wrap_future(job.future)
        except asyncio.CancelledError:
            job.abandoned = True
            raise

    def shutdown(self) -> None:
        self._stopped = True
        self._jobs.put(None)
        self._thread.join(timeout=10)

    # ------------------------------------------------------------ worker thread

    def _run(self, build, built: threading.Event) -> None:
        torch.set_num_threads(self._torch_threads)
        try:
            if self.model is None:
                self.model = build()
        except BaseException as e:  # handed to the constructor, which raises it
            self._build_error = e
            return
        finally:
            built.set()
        while not self._stopped:
            jobs = [self._jobs.get()]
            while True:
                try:
                    jobs.append(self._jobs.get_nowait())
                except queue.Empty:
                    break
            if any(job is None for job in jobs):
                for job in jobs:
                    if job is not None:
                        job.future.cancel()
                return
            self._round(jobs)

    def _round(self, jobs: list[_Job]) -> None:
        rows: list[tuple[_Job, int]] = []
        for job in jobs:
            if job.future.set_running_or_notify_cancel():  # False: cancelled while waiting
                job.started = True
                rows += [(job, i) for i in range(len(job.inputs))]
            else:
                self._finished(len(job.inputs))
        lengths = [len(job.inputs[i]) for job, i in rows]
        for batch in micro_batches(lengths, self.token_budget):
            members = [rows[i] for i in batch]
            if all(job.abandoned or job.future.done() for job, _ in members):
                self._finished(len(members))
                continue
            started = time.perf_counter()
            try:
                vectors = self.model.embed([job.inputs[i] for job, i in members])
            except Exception as e:  # never leave a caller waiting on a failed forward
                logger.exception("embedding forward failed")
                for job in {job for job, _ in members}:
                    if not job.future.done():
                        job.future.set_exception(RuntimeError(f"embedding failed: {type(e).__name__}: {e}"))
                vectors = None
            width = max(lengths[i] for i in batch)
            self._record(len(batch), sum(lengths[i] for i in batch), width * len(batch),
                         time.perf_counter() - started)
            for row, (job, i) in enumerate(members):
                job.remaining -= 1
                self._finished(1)
                if vectors is not None and not job.future.done():
                    if job.out is None:
                        job.out = np.empty((len(job.inputs), vectors.shape[1]), dtype=np.float32)
                    job.out[i] = vectors[row]
                    if job.remaining == 0:
                        job.future.set_result(job.out)

    def _finished(self, inputs: int) -> None:
        with self._lock:
            self.in_flight -= inputs

    def _record(self, rows: int, tokens: int, padded: int, seconds: float) -> None:
        s = self.stats
        s.forwards += 1
        s.inputs += rows
        s.tokens += tokens
        s.padded_tokens += padded
        s.seconds += seconds
        s.log.append((padded, rows, seconds))
