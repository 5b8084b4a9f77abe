"""Constrained decoding: grammars compiled for one tokenizer, a matcher per sequence, and
the token masks the sampler applies. Plain Python + torch, on llguidance (see
docs/grammar-engines.md for why that library and what it costs).

Objects
-------
- `GrammarSpec` (grammar_spec.py): what to generate; built and validated by the ingress,
  carried in `SamplingParams.grammar`.
- `GrammarCompiler`: one per tokenizer (per process). `compile(spec)` returns a
  `concurrent.futures.Future[CompiledGrammar]` at once; the work runs on the compiler's own
  thread, results are cached (LRU, keyed by the spec; failures are cached too). An invalid
  or unsupported grammar fails the future with `GrammarError`.
- `CompiledGrammar.new_state()`: a fresh `GrammarState` (a copy of a template matcher:
  about 4 us), one per sequence; `n` choices of a request each get their own.
- `GrammarState`: `fill_mask(bitmask, row)`, `accept(token)`, `rollback(n)`,
  `check_draft(tokens)`, `is_finished`, `can_advance`.
- `apply_masks(logits, rows, states)`: the batched call the sampler makes.

Contract with the engine (for the sampler integration)
------------------------------------------------------
0. Setup. One compiler per replica process, for the model's tokenizer:
   `GrammarCompiler(tokenizer, vocab_size=<width of the logits>, eos_token_ids=
   engine.eos_token_ids, cache_size=args.grammar_cache_size)`, and `compiler.warm()` at
   start (builds the tokenizer tables, ~1 s for 49k tokens, on the compiler's thread).
1. Admission. When a request with `params.grammar` arrives, the replica calls
   `compiler.compile(params.grammar)` and keeps the Future; the sequence is scheduled
   (its prompt may even be prefilled) but not sampled until the Future is done, so the
   engine thread never waits for a compilation. Then `state = future.result().new_state()`;
   if the Future failed (`GrammarError`: the ingress validated the same spec, so this means
   a different tokenizer/vocabulary), the sequence finishes at once with
   `finish_reason="error"` and `error=str(exc)`.
2. Each step, for the rows that sample: after `process_logits` (penalties, logit_bias,
   min_tokens) and before `sample_next_tokens`, call
   `dead = apply_masks(logits, rows, states)` with the constrained rows only (logits row
   index, state): their disallowed tokens become -inf in place; other rows are not read or
   written, and with no constrained row the call returns at once. It masks `logits` in
   place: the engine's logprobs are taken from the unmasked logits (`raw`), so mask a
   tensor that is not `raw` (`process_logits` already works on a clone; otherwise clone).
   The masks of a step depend only on tokens accepted before it, so `fill_masks` may run
   on another thread while the model's forward runs (llguidance releases the GIL), and
   `apply_bitmask` after it.
3. `dead` lists the positions in `rows` whose grammar cannot advance (no token of the
   vocabulary continues it: an impossible grammar for this tokenizer, or an internal
   error). Such a row must not be sampled (its logits are all -inf); the engine finishes it
   with `finish_reason="error"` and `error=dead_end_message(state)`
   ("grammar_dead_end: ..."), which the frontend turns into a clear 500 naming the
   grammar. It is never left waiting.
4. After sampling, call `state.accept(token)` for each token appended to the sequence, in
   order (including the EOS token that ends it). It returns False only for a token the
   mask did not allow (a sampler bug): finish the row with `error=dead_end_message(state)`.
5. End. The grammar's end allows the EOS token(s) given to the compiler (the engine's
   `eos_token_ids`) and, where it cannot be extended, only them; `state.is_finished`
   becomes True once one is accepted, after which the mask allows only EOS. A row whose
   `max_tokens` runs out first ends with "length" like any other: its output is a prefix
   of a valid one. The frontend refuses `ignore_eos` and `min_tokens` with a grammar, so
   the engine never has to choose between them and the grammar's EOS.
6. Speculation. Drafted positions of a constrained row are masked like decode rows: the
   mask at position j is the state after accepting draft[:j]. `state.fill_draft_masks(
   draft, bitmask, first_row)` fills those k + 1 masks without changing the state
   (positions past the first draft token the grammar refuses get an all-allowed mask:
   their draws are never kept) and returns how many draft tokens the grammar allows. Then
   accept the emitted tokens as in 4. `state.check_draft(tokens)` (how many of them the
   grammar allows, state unchanged) and `state.rollback(n)` are there for other schemes.
7. Threads: a `GrammarState` is used by one thread at a time (the engine's); the compiler
   is thread-safe.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import llguidance
import llguidance.hf
import torch

from serve_app.engine.grammar_spec import (
    DEAD_END, TOOL_CALL_CLOSE, TOOL_CALL_OPEN, TOOL_CALL_SEPARATOR, GrammarSpec, canonical_json,
)

# The JSON we generate is json.dumps's: one line, ", " and ": " between items. Free
# whitespace lets a small model pad with newlines until max_tokens.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class GrammarError(ValueError):
    """A grammar that cannot be used: invalid, or using something unsupported. Its message
    says what (the frontend answers 400 naming the request field)."""


class CompiledGrammar:
    """A grammar ready for one tokenizer: a template matcher that states are copied from."""

    __slots__ = ("_eos", "_template", "spec", "words")

    def __init__(self, spec: GrammarSpec, template: llguidance.LLMatcher, eos: frozenset[int], words: int):
        self.spec = spec
        self._template = template
        self._eos = eos
        self.words = words  # int32 words of its masks: ceil(vocab_size / 32)

    def new_state(self) -> GrammarState:
        return GrammarState(self._template.deep_copy(), self._eos, self.spec, self.words)


class GrammarState:
    """One sequence's position in its grammar."""

    __slots__ = ("_count", "_eos", "_eos_mask", "_finished", "_matcher", "spec", "words")

    def __init__(self, matcher: llguidance.LLMatcher, eos: frozenset[int], spec: GrammarSpec, words: int):
        self._matcher = matcher
        self._eos = eos
        self.spec = spec
        self.words = words
        # The EOS that ends the grammar is kept here, not given to the matcher: llguidance
        # 1.9 does not restore a complete object's state when an EOS is rolled back.
        self._finished = False
        self._eos_mask: torch.Tensor | None = None
        self._count = 0  # tokens accepted, the EOS included (rollback's bound)

    @property
    def is_finished(self) -> bool:
        """An EOS token was accepted: the grammar is complete."""
        return self._finished

    @property
    def can_advance(self) -> bool:
        """Whether some token (an EOS at least) may still be accepted."""
        if self._finished:
            return True
        m = self._matcher
        return not m.is_error() and (not m.is_stopped() or m.is_accepting())

    @property
    def error(self) -> str:
        return self._matcher.get_error()

    def fill_mask(self, bitmask: torch.Tensor, row: int) -> bool:
        """Write this state's allowed tokens into `bitmask[row]` (contiguous int32 words on the
        CPU, bit j of word i = token 32 i + j; words past the vocabulary are cleared).
        Returns False when no token is allowed."""
        if bitmask.shape[1] > self.words:
            bitmask[row, self.words:] = 0
        target = bitmask[row, :self.words]
        if self._finished:
            target.copy_(self._only_eos(self.words))
            return True
        self._matcher.unsafe_compute_mask_ptr(target.data_ptr(), self.words * 4)
        return not self._matcher.is_error() and bool(target.any())

    def _only_eos(self, words: int) -> torch.Tensor:
        if self._eos_mask is None or self._eos_mask.numel() != words:
            self._eos_mask = _mask_of(self._eos, words)
        return self._eos_mask

    def accept(self, token: int) -> bool:
        """Advance by one sampled token. False (state unchanged) if the grammar does not
        allow it here."""
        if self._finished:
            return token in self._eos
        m = self._matcher
        if token in self._eos:
            if not m.is_accepting():
                return False
            self._finished = True
        # llguidance's matcher enters a permanent error state on a refused token: check first.
        elif m.validate_tokens([token]) != 1 or not m.consume_token(token):
            return False
        self._count += 1
        return True

    def rollback(self, n: int) -> None:
        """Undo the last n accepted tokens (speculation: drafts the model did not keep)."""
        if n <= 0:
            return
        if n > self._count:
            raise ValueError(f"cannot roll back {n} tokens: only {self._count} were accepted")
        self._count -= n
        if self._finished:  # the EOS was the last token, and the matcher never saw it
            self._finished = False
            n -= 1
        if n:
            self._matcher.rollback(n)

    def check_draft(self, tokens: Sequence[int]) -> int:
        """How many of `tokens`, in order from the current state, the grammar allows (state unchanged)."""
        if self._finished:
            return 1 if tokens and tokens[0] in self._eos else 0
        end = next((i for i, t in enumerate(tokens) if t in self._eos), len(tokens))
        m = self._matcher
        allowed = m.validate_tokens(list(tokens[:end])) if end else 0
        if allowed < end or end == len(tokens):
            return allowed
        # An EOS after `end` allowed tokens: allowed if the grammar is complete there.
        if end:
            m.consume_tokens(list(tokens[:end]))
        complete = m.is_accepting()
        if end:
            m.rollback(end)
        return end + 1 if complete else end

    def fill_draft_masks(self, draft: Sequence[int], bitmask: torch.Tensor, first_row: int) -> int:
        """Masks for a drafted row: `bitmask[first_row + j]` = the mask after accepting
        draft[:j], for j in 0..len(draft). Rows past the first refused draft token allow
        everything (their draws are never kept). State unchanged; returns the allowed prefix length."""
        allowed = self.check_draft(draft)
        taken = 0
        try:
            for j in range(len(draft) + 1):
                if j > allowed:
                    bitmask[first_row + j].fill_(-1)
                    continue
                self.fill_mask(bitmask, first_row + j)
                if j < allowed and j < len(draft):
                    self.accept(draft[j])
                    taken += 1
        finally:
            self.rollback(taken)
        return allowed


def _mask_of(tokens: Iterable[int], words: int) -> torch.Tensor:
    mask = torch.zeros(words, dtype=torch.int32)
    for t in tokens:
        if t < words * 32:
            bit = t % 32
            mask[t // 32] |= (1 << bit) if bit < 31 else -(1 << 31)
    return mask


def dead_end_message(state: GrammarState) -> str:
    """The error text of a row whose grammar cannot advance."""
    detail = state.error.strip().splitlines()[0] if state.error.strip() else "no token can continue the output"
    return (f"{DEAD_END}: the {state.spec.describe()} grammar cannot be continued by any token of this model's "
            f"vocabulary ({detail})")


# ---------------------------------------------------------------- batched masks


def bitmask_words(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


def fill_masks(states: Sequence[GrammarState], bitmask: torch.Tensor) -> list[int]:
    """`bitmask[i]` = the mask of `states[i]`; returns the i whose grammar cannot advance."""
    return [i for i, state in enumerate(states) if not state.fill_mask(bitmask, i)]


# byte value -> its 8 tokens blocked (little-endian words: byte k of word i = tokens 32i+8k..32i+8k+7)
_BLOCKED_BY_BYTE = ((torch.arange(256).unsqueeze(-1) >> torch.arange(8)) & 1) == 0
_blocked_tables: dict[torch.device, torch.Tensor] = {}


def apply_bitmask(logits: torch.Tensor, rows: Sequence[int], bitmask: torch.Tensor) -> None:
    """Set to -inf, in place, the tokens `bitmask[i]` blocks in `logits[rows[i]]`. Tokens past
    the mask's width (a padded vocabulary) are blocked. A 256-entry table turns each mask byte
    into 8 booleans: 2.3 ms for [32, 49152] on one CPU core, against 3.8 ms shifting by 0..31
    and 6.6 ms for xgrammar's C++ kernel (docs/grammar-engines.md)."""
    if not rows:
        return
    device = logits.device
    table = _blocked_tables.get(device)
    if table is None:
        table = _blocked_tables[device] = _BLOCKED_BY_BYTE.to(device)
    n, vocab = len(rows), logits.shape[-1]
    words = bitmask[:n].to(device, non_blocking=True)
    blocked = table.index_select(0, words.view(torch.uint8).reshape(-1).long()).view(n, -1)
    if blocked.shape[1] < vocab:
        blocked = torch.nn.functional.pad(blocked, (0, vocab - blocked.shape[1]), value=True)
    blocked = blocked[:, :vocab]
    if list(rows) == list(range(logits.shape[0])):
        logits.masked_fill_(blocked, float("-inf"))
        return
    index = torch.tensor(rows, device=device)
    logits.index_copy_(0, index, logits.index_select(0, index).masked_fill_(blocked, float("-inf")))


def apply_masks(logits: torch.Tensor, rows: Sequence[int], states: Sequence[GrammarState]) -> list[int]:
    """Mask the constrained rows of a batch in place: `logits[rows[i]]` by `states[i]`.
    Unconstrained rows are untouched; with no constrained row this returns at once.
    Returns the positions i (in `rows`) whose grammar cannot advance: see the module
    docstring (3)."""
    if not rows:
        return []
    words = max(bitmask_words(logits.shape[-1]), max(state.words for state in states))
    bitmask = torch.empty(len(rows), words, dtype=torch.int32)
    dead = fill_masks(states, bitmask)
    apply_bitmask(logits, rows, bitmask)
    return dead


# ---------------------------------------------------------------- compiling


def strict_schema(schema):
    """The schema with `additionalProperties: false` on every object schema that lists
    `properties` and says nothing about others: what a model writes then stops at the
    named properties (as OpenAI's strict mode and xgrammar's default). Outputs still
    validate against the original schema."""
    if isinstance(schema, list):
        return [strict_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas"):
        if isinstance(out.get(key), dict):
            out[key] = {name: strict_schema(s) for name, s in out[key].items()}
    for key in ("items", "prefixItems", "additionalProperties", "anyOf", "oneOf", "allOf", "not", "if", "then",
                "else", "contains", "additionalItems", "unevaluatedItems", "propertyNames"):
        if key in out:
            out[key] = strict_schema(out[key])
    if ("properties" in out and "additionalProperties" not in out and "patternProperties" not in out
            and "unevaluatedProperties" not in out):
        out["additionalProperties"] = False
    return out


def ascii_digits(pattern: str) -> str:
    """`\\d` as [0-9] and `\\D` as [^0-9], as in JSON Schema patterns (ECMAScript). The
    regex library's own `\\d` is any Unicode digit: `\\d{3}` would allow "٣٤٥"."""
    out, i, in_class = [], 0, False
    while i < len(pattern):
        ch = pattern[i]
        if ch == "\\" and i + 1 < len(pattern):
            nxt = pattern[i + 1]
            if nxt == "d":
                out.append("0-9" if in_class else "[0-9]")
            elif nxt == "D" and not in_class:
                out.append("[^0-9]")
            else:
                out.append(ch + nxt)
            i += 2
            continue
        if ch == "[" and not in_class:
            in_class = True
        elif ch == "]" and in_class:
            in_class = False
        out.append(ch)
        i += 1
    return "".join(out)


def _schema_grammar(schema) -> str:
    return llguidance.LLMatcher.grammar_from_json_schema(strict_schema(schema), defaults=JSON_OPTIONS)


def _tool_calls_lark(spec: GrammarSpec) -> str:
    """One call: TOOL_CALL_OPEN {"name": <a tool>, "arguments": <its schema>} TOOL_CALL_CLOSE;
    with `parallel`, one or more separated by TOOL_CALL_SEPARATOR; with a `value` (a JSON
    schema), either those calls or a JSON answer matching it."""
    rules = []
    for i, tool in enumerate(spec.tools):
        call = {"x-guidance": JSON_OPTIONS, "type": "object",
                "properties": {"name": {"const": tool.name}, "arguments": json.loads(tool.parameters)},
                "required": ["name", "arguments"]}
        rules.append(f"tool_{i}: %json {canonical_json(strict_schema(call))}")
    call_rule = "call: " + json.dumps(TOOL_CALL_OPEN) + " (" + " | ".join(
        f"tool_{i}" for i in range(len(spec.tools))) + ") " + json.dumps(TOOL_CALL_CLOSE)
    calls = f"calls: call ({json.dumps(TOOL_CALL_SEPARATOR)} call)*" if spec.parallel else "calls: call"
    start = "start: calls"
    if spec.value:  # or an answer: JSON matching the response format's schema
        answer = {"x-guidance": JSON_OPTIONS, **strict_schema(json.loads(spec.value))}
        start = "start: calls | answer"
        rules.append(f"answer: %json {canonical_json(answer)}")
    return "\n".join([start, calls, call_rule, *rules]) + "\n"


def grammar_text(spec: GrammarSpec) -> str:
    """The llguidance grammar of a spec (no tokenizer needed). Raises GrammarError for text
    that is not even well-formed (a schema that is not JSON)."""
    try:
        if spec.kind == "json_schema":
            return _schema_grammar(json.loads(spec.value))
        if spec.kind == "json_object":
            return _schema_grammar({"type": "object"})
        if spec.kind == "regex":
            return llguidance.LLMatcher.grammar_from_regex(ascii_digits(spec.value))
        if spec.kind == "choice":
            return llguidance.grammar_from("choice", list(spec.choices))
        if spec.kind == "grammar":
            return llguidance.grammar_from("grammar", spec.value)  # Lark, or GBNF converted to Lark
        if spec.kind == "tool_calls":
            return llguidance.LLMatcher.grammar_from_lark(_tool_calls_lark(spec))
    except (ValueError, TypeError, RecursionError) as e:
        raise GrammarError(f"invalid {spec.describe()}: {e}") from None
    raise GrammarError(f"unknown grammar kind {spec.kind!r}")


class GrammarCompiler:
    """Compiles grammar specs for one tokenizer off the caller's thread, with an LRU cache.

    `vocab_size`: width of the model's logits (may exceed the tokenizer's: padding, never
    allowed). `eos_token_ids`: the tokens that end a sequence (default: the tokenizer's
    EOS). The tokenizer's own grammar tables (about 1 s for a 49k vocabulary) are built on
    the compiler thread at the first compile, or at `warm()`."""

    def __init__(self, tokenizer, *, vocab_size: int | None = None, eos_token_ids: Iterable[int] | None = None,
                 cache_size: int = 256, threads: int = 1):
        self._hf_tokenizer = tokenizer
        self.vocab_size = vocab_size or len(tokenizer)
        eos = set(eos_token_ids or ())
        if not eos and tokenizer.eos_token_id is not None:
            eos.add(tokenizer.eos_token_id)
        self.eos_token_ids = frozenset(eos)
        self.cache_size = cache_size
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="grammar")
        self._lock = threading.Lock()
        self._cache: OrderedDict[GrammarSpec, Future] = OrderedDict()
        self._ll_tokenizer: llguidance.LLTokenizer | None = None
        self._tokenizer_lock = threading.Lock()
        self.compilations = 0  # grammars actually compiled (cache misses)

    def warm(self) -> Future:
        """Build the tokenizer tables now (on the compiler thread), so the first request does not wait."""
        return self._executor.submit(self._tokenizer)

    def compile(self, spec: GrammarSpec) -> Future[CompiledGrammar]:
        """The compiled grammar of `spec`, as a Future: done at once on a cache hit."""
        with self._lock:
            future = self._cache.get(spec)
            if future is not None:
                self._cache.move_to_end(spec)
                return future
            future = self._executor.submit(self._compile, spec)
            self._cache[spec] = future
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        future.add_done_callback(lambda f: self._forget_unless_grammar_error(spec, f))
        return future

    def _forget_unless_grammar_error(self, spec: GrammarSpec, future: Future) -> None:
        exc = future.exception()
        if exc is not None and not isinstance(exc, GrammarError):  # not the grammar's fault: retry next time
            with self._lock:
                if self._cache.get(spec) is future:
                    del self._cache[spec]

    def compile_now(self, spec: GrammarSpec, timeout: float | None = None) -> CompiledGrammar:
        """`compile(spec).result()`: for callers that may block (the ingress's preparing thread)."""
        return self.compile(spec).result(timeout)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _tokenizer(self) -> llguidance.LLTokenizer:
        with self._tokenizer_lock:
            if self._ll_tokenizer is None:
                try:
                    self._ll_tokenizer = llguidance.hf.from_tokenizer(
                        self._hf_tokenizer, n_vocab=self.vocab_size, eos_token=sorted(self.eos_token_ids))
                except ValueError as e:  # a slow (Python) tokenizer
                    raise GrammarError(f"structured output needs a fast tokenizer: {e}") from None
            return self._ll_tokenizer

    def _compile(self, spec: GrammarSpec) -> CompiledGrammar:
        tokenizer = self._tokenizer()
        text = grammar_text(spec)
        error = llguidance.LLMatcher.validate_grammar(text, tokenizer)
        if error:
            raise GrammarError(f"invalid {spec.describe()}: {_first_lines(error)}")
        template = llguidance.LLMatcher(tokenizer, text, log_level=0)
        # The first mask builds the lexer's lazy parts here rather than on the engine's thread,
        # and finds grammars no token can start.
        probe = torch.zeros(1, bitmask_words(self.vocab_size), dtype=torch.int32)
        template.unsafe_compute_mask_ptr(probe.data_ptr(), probe.numel() * 4)
        if template.is_error() or not bool(probe.any()):
            raise GrammarError(f"the {spec.describe()} grammar allows no output with this model's vocabulary")
        self.compilations += 1
        return CompiledGrammar(spec, template, self.eos_token_ids, bitmask_words(self.vocab_size))


def _first_lines(text: str, n: int = 4) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return "\n".join(lines[:n])
