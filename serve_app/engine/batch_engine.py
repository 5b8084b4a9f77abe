"""Continuous batching, one step at a time: schedule, run, postprocess (nano-vllm's shape).

Each `step()` asks the `Scheduler` for a token-budgeted mix of work (one token for every
decoding sequence, plus prompt chunks), packs those tokens into one row (model_runner.py),
runs the model runner's forward over the paged KV cache, samples a token for every sequence
that reached the end of its prompt, and retires finished or cancelled sequences (their blocks
go back to the block manager, full ones staying in the prefix cache). A decoding row with a
speculative draft (speculation.py) runs as a chunk of its last token + the draft and keeps the
part of the draft that its own draws agree with.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

import torch

from serve_app.engine.block_manager import BlockManager
from serve_app.engine.constraints import Constraints, RowFailed
from serve_app.engine.engine_config import EngineConfig
from serve_app.engine.kv_cache import KVCache
from serve_app.engine.model_runner import build_runner, pack_step, weights_per_token
from serve_app.engine.precision import choose_kv_dtype
from serve_app.engine.prefix_hash import sequence_salt
from serve_app.engine.sampling import process_logits, sample_next_tokens, token_logprobs
from serve_app.engine.scheduler import MIN_PREFILL, ScheduledStep, Scheduler, attention_horizon
from serve_app.engine.sequence import Sequence
from serve_app.engine.speculation import check_drafts
from serve_app.engine.types import GenerationRequest, SequenceOutput

logger = logging.getLogger(__name__)


class BatchEngine:
    """Generates for many sequences at once; not thread-safe (one driver thread)."""

    def __init__(self, model, tokenizer, eos_token_ids: Iterable[int], config: EngineConfig):
        self.config = config
        horizon = attention_horizon(weights_per_token(model), model.config)
        self.runner = build_runner(model, config.max_model_len, config.runner,
                                   graph_rows=config.max_num_seqs if config.cuda_graphs else 0)
        self.tokenizer = tokenizer
        self.device = self.runner.device
        self.dtype = self.runner.dtype
        self.dtype_reason = "configured"  # why this dtype (set by factory.build_engine)
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_batch_size = config.max_num_seqs
        self.max_model_len = config.max_model_len
        self.kv_dtype, self.kv_dtype_reason = choose_kv_dtype(config.kv_cache_dtype, self.runner.attention_dtype,
                                                              self.device, self.dtype)
        self.kv = KVCache.for_model(self.runner.config, config.kv_cache_tokens, config.block_size, self.kv_dtype,
                                    self.device)
        self.blocks = BlockManager(self.kv.num_blocks, config.block_size, config.enable_prefix_caching, self.device)
        self.constraints = Constraints(tokenizer, self.runner.config.vocab_size, self.eos_token_ids,
                                       config.grammar_cache_size)
        self.scheduler = Scheduler(self.blocks, config.max_num_seqs, config.max_num_batched_tokens,
                                   config.num_speculative_tokens, config.speculative_max_rows, horizon)
        # Steps longer than this silence every stream that long: after a step overran it the
        # token budget shrinks (down to the decode rows + MIN_PREFILL), e.g. while prompt chunks
        # attend to thousands of past tokens on a slow CPU, and grows back after (_adapt_budget).
        self.step_time_target_s = config.step_time_target_s
        self._cancelled: set[str] = set()
        self.last_step_tokens = 0  # tokens computed by the last step (decode rows + prompt chunks)
        self.last_step_rows = 0  # sequences in the last step
        self.last_step_seconds = 0.0  # wall time of the last step
        self._step_started = 0.0
        self.num_cancelled = 0  # sequences cancelled so far (for stats)
        self.draft_tokens = 0  # speculative tokens checked so far, and how many of them were kept
        self.accepted_draft_tokens = 0

    # ------------------------------------------------------------ public

    def add(self, request: GenerationRequest) -> None:
        if len(request.prompt_token_ids) >= self.max_model_len:
            raise ValueError(f"prompt of {len(request.prompt_token_ids)} tokens does not fit "
                             f"the context of {self.max_model_len}")
        salt = sequence_salt(self.config.cache_salt, request.cache_salt)
        seq = Sequence(request, self.tokenizer, self.device, self.max_model_len, self.config.block_size, salt)
        self.scheduler.add(seq)
        self.constraints.submit(seq)

    def cancel(self, request_id: str) -> None:
        """Stop a sequence at the next step boundary (waiting or running)."""
        self._cancelled.add(request_id)

    @property
    def has_work(self) -> bool:
        return self.scheduler.num_sequences > 0

    @property
    def num_sequences(self) -> int:
        return self.scheduler.num_sequences

    @property
    def running(self) -> list[Sequence]:
        return self.scheduler.running

    @property
    def waiting(self):
        return self.scheduler.waiting

    def stats(self) -> dict:
        """What the engine has done and holds (read from another thread: plain counters)."""
        blocks = self.blocks
        return {
            "cancelled_sequences": self.num_cancelled,
            "draft_tokens": self.draft_tokens,
            "accepted_draft_tokens": self.accepted_draft_tokens,
            "max_model_len": self.max_model_len,
            "max_num_batched_tokens": self.scheduler.max_num_batched_tokens,
            "dtype": str(self.dtype).removeprefix("torch."),
            "dtype_reason": self.dtype_reason,
            "kv_cache_dtype": str(self.kv_dtype).removeprefix("torch."),
            "kv_cache_dtype_reason": self.kv_dtype_reason,
            "runner": self.runner.name,
            # captured decode graphs (rows, blocks); None where decode steps are not replayed (CPU)
            "cuda_graphs": sorted(graphs.graphs) if (graphs := getattr(self.runner, "graphs", None)) else None,
            "kv_cache_tokens": blocks.capacity_tokens,
            "kv_cache_free_blocks": blocks.num_free_blocks,
            "kv_cache_blocks": blocks.num_blocks,
            "prefix_cache_blocks": blocks.num_cached_blocks,
            "prefix_cache_queries": blocks.queries,
            "prefix_cache_hits": blocks.hits,
        }

    @torch.inference_mode()
    def step(self) -> list[SequenceOutput]:
        """Run one scheduled step; return what changed (new text, finished sequences)."""
        self._step_started = time.perf_counter()
        try:
            return self._step()
        finally:
            self.last_step_seconds = time.perf_counter() - self._step_started

    def _step(self) -> list[SequenceOutput]:
        outputs = self._drop_cancelled()
        for seq, error in self.constraints.resolve(self.scheduler.waiting):
            outputs.append(self._fail(seq, error))
        try:
            plan = self.scheduler.schedule()
            self.last_step_tokens = plan.num_tokens
            self.last_step_rows = len(plan.decodes) + len(plan.prefills) + len(plan.drafts)
            if not plan:
                return outputs
            sampled, logits = self._forward(plan)
        except Exception as e:  # e.g. out of memory: the step is lost for every sequence in it
            logger.exception("engine step failed; failing every sequence it holds")
            return outputs + self.abort_all(f"generation failed: {type(e).__name__}: {e}")
        outputs += self._advance(sampled, logits[:len(sampled)])
        outputs += self._verify_drafts(plan.drafts, logits[len(sampled):])
        self._adapt_budget(time.perf_counter() - self._step_started, plan.num_tokens)
        return outputs

    def _adapt_budget(self, seconds: float, tokens: int) -> None:
        """Shrink the next step's budget in proportion when a step overran the target; grow it
        back by a quarter per step that did not. (Cost per token is no guide: decode rows cost
        far more than prompt tokens, so a per-token model starved prefill at high concurrency.)"""
        if self.step_time_target_s is None or not tokens:
            return
        sched = self.scheduler
        if seconds > self.step_time_target_s:
            budget = int(min(sched.token_budget, tokens) * self.step_time_target_s / seconds)
        else:
            budget = int(sched.token_budget * 1.25) + 1
        sched.token_budget = max(MIN_PREFILL, min(budget, sched.max_num_batched_tokens))

    def abort_all(self, error: str) -> list[SequenceOutput]:
        """Fail every sequence (after an unrecoverable error) and return their blocks."""
        outs = []
        for seq in [*self.scheduler.running, *self.scheduler.waiting]:
            seq.finish_reason = "error"
            out = seq.output("", [])
            out.error = error
            outs.append(out)
            self.scheduler.remove(seq)
        self._cancelled.clear()
        return outs

    # ------------------------------------------------------------ one step

    def _forward(self, plan: ScheduledStep) -> tuple[list[Sequence], torch.Tensor]:
        """Run the step; return the sequences to sample and the logits: one row per sequence
        to sample, then 1 + k rows per drafted row, in plan order."""
        step = pack_step(plan, self.kv, self.device, self.runner.attention_dtype)
        logits = self.runner.forward(step)
        for seq in plan.decodes:
            seq.num_cached = seq.total_len
        for seq, _ in plan.drafts:  # the drafted positions count once checked (_verify_drafts)
            seq.num_cached = seq.total_len
        for seq, n in plan.prefills:
            seq.num_cached += n
            self.blocks.mark_computed(seq)
        for seq in plan.decodes:
            self.blocks.mark_computed(seq)
        return step.sampled, logits

    def _advance(self, seqs: list[Sequence], logits: torch.Tensor) -> list[SequenceOutput]:
        """Sample one token per sequence, update text and finish state, retire finished ones."""
        if not seqs:
            return []
        params = [s.params for s in seqs]
        raw = logits
        if any(p.processes_logits for p in params):
            logits = process_logits(logits.float().clone(), params, [(s.prompt_ids, s.output_ids) for s in seqs],
                                    self.eos_token_ids)
        logits, dead = self.constraints.mask(logits, seqs, raw)
        tokens = sample_next_tokens(logits, params, [s.generator for s in seqs])
        for i, error in dead.items():  # no token continues its grammar
            tokens[i] = RowFailed(error)
        logprobs: dict[int, tuple] = {}
        rows = [i for i, p in enumerate(params) if p.logprobs is not None and isinstance(tokens[i], int)]
        if rows:
            found = token_logprobs(raw[rows], [tokens[i] for i in rows], [params[i].logprobs for i in rows])
            logprobs = dict(zip(rows, found))
        outputs = []
        for i, (seq, token) in enumerate(zip(seqs, tokens)):
            out = self._emit(seq, [token])
            if i in logprobs and out.error is None:
                out.logprobs = [logprobs[i]]
            outputs.append(out)
        return outputs

    def _verify_drafts(self, drafts: list[tuple[Sequence, list[int]]], logits: torch.Tensor) -> list[SequenceOutput]:
        """Emit what each drafted row keeps (speculation.check_drafts: 1 to k + 1 tokens)."""
        if not drafts:
            return []
        seqs = [seq for seq, _ in drafts]
        logits = self.constraints.mask_drafts(logits, drafts)
        emitted = check_drafts(logits, [d for _, d in drafts], [s.params for s in seqs], [s.generator for s in seqs])
        outputs = []
        for (seq, draft), tokens in zip(drafts, emitted):
            kept = len(tokens) - 1
            self.draft_tokens += len(draft)
            self.accepted_draft_tokens += kept
            seq.record_draft(len(draft), kept, self.scheduler.num_speculative_tokens)
            seq.num_cached += kept  # the kept drafts' keys/values are right; the rest get overwritten
            outputs.append(self._emit(seq, tokens))
            if seq.block_table:  # still running: the kept drafts' blocks may now be full
                self.blocks.mark_computed(seq)
        return outputs

    def _emit(self, seq: Sequence, tokens: list[int | Exception]) -> SequenceOutput:
        """Append tokens to a sequence until one finishes it; its output for this step.
        A failure fails this sequence only: the others in the batch go on."""
        text, taken = "", []
        try:
            for token in tokens:
                text += self._advance_one(seq, token)
                taken.append(token)
                if seq.finish_reason:
                    break
        except RowFailed as e:
            return self._fail(seq, str(e))
        except Exception as e:
            logger.exception("sequence %s failed", seq.request_id)
            return self._fail(seq, f"generation failed: {type(e).__name__}: {e}")
        return seq.output(text, taken)

    def _fail(self, seq: Sequence, error: str) -> SequenceOutput:
        """End one sequence with an error (the others in the batch go on)."""
        seq.finish_reason = "error"
        self.scheduler.remove(seq)
        out = seq.output("", [])
        out.error = error
        return out

    def _advance_one(self, seq: Sequence, token: int | Exception) -> str:
        """Append one token; the text it completes (finishing the sequence when it should)."""
        if isinstance(token, Exception):
            raise token
        seq.output_ids.append(token)
        self.constraints.accept(seq, token)
        is_eos = token in self.eos_token_ids and not seq.params.ignore_eos
        text = "" if is_eos else seq.detok.add_token(token)
        if is_eos or seq.detok.stopped:
            seq.finish_reason = "stop"
        elif len(seq.output_ids) >= seq.params.max_tokens or seq.total_len >= self.max_model_len:
            seq.finish_reason = "length"
        if seq.finish_reason:
            if not seq.detok.stopped:
                text += seq.detok.flush()
            self.scheduler.remove(seq)
        return text

    def _drop_cancelled(self) -> list[SequenceOutput]:
        if not self._cancelled:
            return []
        outputs = []
        for seq in [*self.scheduler.waiting, *self.scheduler.running]:
            if seq.request_id in self._cancelled:
                seq.finish_reason = "cancelled"
                self.num_cancelled += 1
                outputs.append(seq.output("", []))
                self.scheduler.remove(seq)
        self._cancelled.clear()
        return outputs
