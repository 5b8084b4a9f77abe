"""xgrammar vs llguidance on this machine, with the built-in chat model's tokenizer.

    python -m bench.grammar_engines [--rows 32] [--steps 40] [--threads 1]

Prints markdown tables (docs/grammar-engines.md holds a run and the conclusions):
(a) compile time per grammar (compile + matcher + first mask, cold: no cache),
(b) per-step cost for `rows` rows, each its own matcher, walking a realistic document:
    fill the [rows, vocab/32] bitmask and accept the chosen token; then applying such a
    bitmask to a [rows, vocab] float32 logits tensor (the same format for both libraries;
    llguidance.torch's own apply is torch.compile'd, which needs a C compiler on CPU),
(c) accept + rollback of k tokens and checking a k-token draft,
(d) what termination and a dead end look like.
Both libraries are optional dependencies: the script measures whichever is installed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

SCHEMAS: dict[str, dict] = {
    "nested": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 40},
            "age": {"type": "integer", "minimum": 0, "maximum": 150},
            "email": {"type": "string", "pattern": "^[a-z0-9.]+@[a-z0-9]+\\.[a-z]{2,4}$"},
            "address": {
                "type": "object",
                "properties": {
                    "street": {"type": "string"},
                    "city": {"type": "string"},
                    "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                },
                "required": ["street", "city"],
            },
            "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b", "vip"]},
                     "minItems": 1, "maxItems": 3},
        },
        "required": ["name", "age", "address"],
    },
    "array-bounds": {
        "type": "object",
        "properties": {
            "points": {"type": "array", "minItems": 2, "maxItems": 5,
                       "items": {"type": "object",
                                 "properties": {"x": {"type": "number", "minimum": -10, "maximum": 10},
                                                "y": {"type": "number", "exclusiveMinimum": 0}},
                                 "required": ["x", "y"]}},
        },
        "required": ["points"],
    },
    "enum+ranges": {
        "type": "object",
        "properties": {
            "status": {"enum": ["active", "inactive", "banned"]},
            "level": {"type": "integer", "minimum": 1, "maximum": 9},
            "score": {"type": "number", "minimum": 0, "maximum": 1},
            "flag": {"type": "boolean"},
            "note": {"type": ["string", "null"]},
        },
        "required": ["status", "level", "score", "flag"],
    },
    "maxLength": {  # pydantic's Field(max_length=...) writes this
        "type": "object",
        "properties": {"title": {"type": "string", "maxLength": 60}, "summary": {"type": "string", "maxLength": 200}},
        "required": ["title", "summary"],
    },
    "tool-call": {  # what tool_choice=required with two tools compiles to (roughly)
        "anyOf": [
            {"type": "object", "properties": {
                "name": {"const": "get_weather"},
                "arguments": {"type": "object", "properties": {
                    "city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
                    "required": ["city"]}},
             "required": ["name", "arguments"]},
            {"type": "object", "properties": {
                "name": {"const": "search"},
                "arguments": {"type": "object", "properties": {
                    "query": {"type": "string"}, "limit": {"type": "integer", "minimum": 1, "maximum": 50}},
                    "required": ["query"]}},
             "required": ["name", "arguments"]},
        ],
    },
}

# A valid instance of each grammar, as a model would write it: the walk in (b) follows it.
DOCUMENTS: dict[str, str] = {
    "nested": json.dumps({"name": "Ada Lovelace", "age": 36, "email": "ada@math.org",
                          "address": {"street": "12 St James's Square", "city": "London", "zip": "10001"},
                          "tags": ["vip", "a"]}),
    "array-bounds": json.dumps({"points": [{"x": 1.5, "y": 2}, {"x": -3, "y": 0.25}, {"x": 9.75, "y": 12}]}),
    "maxLength": json.dumps({"title": "Grammar engines", "summary": "Two libraries measured on two cores."}),
    "enum+ranges": json.dumps({"status": "active", "level": 7, "score": 0.875, "flag": True, "note": None}),
    "tool-call": json.dumps({"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}),
    "json_object": json.dumps({"answer": "The capital of France is Paris.", "confidence": 0.9,
                               "sources": ["wikipedia", "atlas"], "nested": {"ok": True, "n": None}}),
    "regex": "2024-11-30T07:22:15Z",
    "choice": "negative",
    "lark": "(12 + 3.5) * (7 - 2) / 4",
}
REGEX = r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z"
CHOICES = ["positive", "negative", "neutral"]
LARK = r"""
start: expr
expr: term (("+" | "-") term)*
term: factor (("*" | "/") factor)*
factor: NUMBER | "(" expr ")" | "-" factor
NUMBER: /[0-9]+(\.[0-9]+)?/
%ignore " "
"""
GRAMMARS = [*SCHEMAS, "json_object", "regex", "choice", "lark"]


def load_tokenizer():
    from transformers import AutoTokenizer

    from serve_app.engine.builtin_models import resolve_model_path

    return AutoTokenizer.from_pretrained(resolve_model_path("builtin:smollm2-135m-instruct"))


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, (time.perf_counter() - start) * 1000


def unpack_bitmask_apply(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """Plain-torch application of an int32 bitmask (bit j of word i = token 32i+j) to logits:
    shift every word by 0..31 (the obvious way)."""
    bits = torch.arange(32, dtype=torch.int32)
    allowed = ((bitmask.unsqueeze(-1) >> bits) & 1).bool().view(bitmask.shape[0], -1)[:, : logits.shape[1]]
    logits.masked_fill_(~allowed, float("-inf"))


_BLOCKED = ((torch.arange(256).unsqueeze(-1) >> torch.arange(8)) & 1) == 0  # byte value -> its 8 blocked bits


def lut_bitmask_apply(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """The same through a 256-entry table: each byte of the mask selects its 8 booleans
    (little-endian words: byte k of word i holds tokens 32i+8k .. 32i+8k+7)."""
    blocked = _BLOCKED.index_select(0, bitmask.view(torch.uint8).reshape(-1).long())
    logits.masked_fill_(blocked.view(bitmask.shape[0], -1)[:, : logits.shape[1]], float("-inf"))


# ---------------------------------------------------------------- the two engines behind one shape


class XGrammarEngine:
    name = "xgrammar"

    def __init__(self, tokenizer, threads: int):
        import xgrammar as xgr

        self.xgr = xgr
        self.vocab = len(tokenizer)
        (self.info, self.tokenizer_ms) = timed(xgr.TokenizerInfo.from_huggingface, tokenizer,
                                               vocab_size=self.vocab, stop_token_ids=[tokenizer.eos_token_id])
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=threads, cache_enabled=False)
        self.batch = xgr.BatchGrammarMatcher(max_threads=threads)

    def compile(self, kind: str):
        c = self.compiler
        if kind in SCHEMAS:
            return c.compile_json_schema(json.dumps(SCHEMAS[kind]), any_whitespace=False)
        if kind == "json_object":
            return c.compile_json_schema('{"type": "object"}', any_whitespace=False)
        if kind == "regex":
            return c.compile_regex(REGEX)
        if kind == "choice":
            return c.compile_regex("|".join(CHOICES))
        if kind == "lark":
            return c.compile_lark(LARK)
        raise KeyError(kind)

    def matcher(self, compiled):
        return self.xgr.GrammarMatcher(compiled)

    def bitmask(self, rows: int) -> torch.Tensor:
        return self.xgr.allocate_token_bitmask(rows, self.vocab)

    def fill(self, matchers, bitmask) -> None:
        self.batch.batch_fill_next_token_bitmask(matchers, bitmask)

    def fill_one(self, m, bitmask, row: int) -> None:
        m.fill_next_token_bitmask(bitmask, row)

    def accept(self, m, token: int) -> bool:
        return m.accept_token(token)

    def rollback(self, m, k: int) -> None:
        m.rollback(k)

    def check_draft(self, m, draft: list[int]) -> int:
        """How many draft tokens the grammar allows (state unchanged after)."""
        n = 0
        for t in draft:
            if not m.accept_token(t):
                break
            n += 1
        if n:
            m.rollback(n)
        return n

    def finished(self, m) -> bool:
        return m.is_terminated()

    def describe(self, m) -> str:
        return f"terminated={m.is_terminated()} completed={m.is_completed()}"


class LLGuidanceEngine:
    name = "llguidance"

    def __init__(self, tokenizer, threads: int):
        import llguidance
        import llguidance.hf

        self.llg = llguidance
        self.vocab = len(tokenizer)
        (self.tok, self.tokenizer_ms) = timed(llguidance.hf.from_tokenizer, tokenizer, n_vocab=self.vocab)
        self.executor = llguidance.LLExecutor(num_threads=threads)

    def grammar(self, kind: str) -> str:
        M = self.llg.LLMatcher
        # The same output shape as xgrammar's any_whitespace=False: json.dumps's separators.
        opts = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
        if kind in SCHEMAS:
            return M.grammar_from_json_schema(SCHEMAS[kind], defaults=opts)
        if kind == "json_object":
            return M.grammar_from_json_schema({"type": "object"}, defaults=opts)
        if kind == "regex":
            return M.grammar_from_regex(REGEX)
        if kind == "choice":
            return M.grammar_from_regex("|".join(CHOICES))
        if kind == "lark":
            return M.grammar_from_lark(LARK)
        raise KeyError(kind)

    def compile(self, kind: str):
        g = self.grammar(kind)
        err = self.llg.LLMatcher.validate_grammar(g, self.tok)
        if err:
            raise ValueError(err)
        return g

    def matcher(self, compiled):
        m = self.llg.LLMatcher(self.tok, compiled, log_level=0)
        assert not m.is_error(), m.get_error()
        return m

    def bitmask(self, rows: int) -> torch.Tensor:
        return torch.full((rows, (self.vocab + 31) // 32), -1, dtype=torch.int32)

    def fill(self, matchers, bitmask) -> None:
        self.executor.unsafe_compute_mask_ptr([(m, i) for i, m in enumerate(matchers)], bitmask.data_ptr(),
                                              bitmask.shape[1] * 4, bitmask.shape[0])

    def fill_one(self, m, bitmask, row: int) -> None:
        v = bitmask[row]
        m.unsafe_compute_mask_ptr(v.data_ptr(), v.numel() * 4)

    def accept(self, m, token: int) -> bool:
        return m.consume_token(token)

    def rollback(self, m, k: int) -> None:
        m.rollback(k)

    def check_draft(self, m, draft: list[int]) -> int:
        return m.validate_tokens(draft)

    def finished(self, m) -> bool:
        return m.is_stopped()

    def describe(self, m) -> str:
        return (f"stopped={m.is_stopped()} accepting={m.is_accepting()} error={m.is_error()} "
                f"reason={m.stop_reason()}")


# ---------------------------------------------------------------- measurements


def measure_compile(engine, kinds, repeats: int) -> dict[str, float]:
    """Cold compile + matcher + first mask (llguidance builds parts of its lexer lazily)."""
    out = {}
    bitmask = engine.bitmask(1)
    for kind in kinds:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            m = engine.matcher(engine.compile(kind))
            engine.fill_one(m, bitmask, 0)
            times.append((time.perf_counter() - start) * 1000)
        out[kind] = statistics.median(times)
    return out


def document_tokens(tokenizer, kind: str) -> list[int]:
    return tokenizer(DOCUMENTS[kind], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def measure_steps(engine, tokenizer, kind: str, rows: int, steps: int) -> dict[str, float]:
    """Rows walk the kind's document (each at its own offset, restarting at its end): per step,
    fill the batch's masks, check the document's next token is allowed and accept it.
    Returns medians and minimums (the host is shared: the minimum is the cost, the median
    what it was like) in ms, and the last step's bitmask."""
    compiled = engine.compile(kind)
    doc = document_tokens(tokenizer, kind)
    matchers = [engine.matcher(compiled) for _ in range(rows)]
    pos = [0] * rows
    for i, m in enumerate(matchers):  # stagger the rows through the document
        for t in doc[: (i * 7) % (len(doc) - 1)]:
            assert engine.accept(m, t)
            pos[i] += 1
    bitmask = engine.bitmask(rows)
    fill_ms, accept_ms, fill_serial_ms = [], [], []
    for step in range(steps):
        # One fill per state (a second fill of the same state may hit a cache): batched on even
        # steps, row by row on odd ones.
        if step % 2 == 0:
            fill_ms.append(timed(engine.fill, matchers, bitmask)[1])
        else:
            start = time.perf_counter()
            for i, m in enumerate(matchers):
                engine.fill_one(m, bitmask, i)
            fill_serial_ms.append((time.perf_counter() - start) * 1000)
        start = time.perf_counter()
        for i, m in enumerate(matchers):
            token = doc[pos[i]]
            assert (bitmask[i, token // 32] >> (token % 32)) & 1, (engine.name, kind, i, pos[i])
            assert engine.accept(m, token), (engine.name, kind, pos[i])
            pos[i] += 1
        accept_ms.append((time.perf_counter() - start) * 1000)
        for i in range(rows):
            if pos[i] == len(doc):
                matchers[i] = engine.matcher(compiled)
                pos[i] = 0
    med = statistics.median
    return {"fill": med(fill_ms), "fill_min": min(fill_ms), "fill_serial": med(fill_serial_ms),
            "fill_serial_min": min(fill_serial_ms), "accept": med(accept_ms), "accept_min": min(accept_ms),
            "bitmask": bitmask}


def measure_rollback(engine, tokenizer, k: int, repeats: int) -> dict[str, float]:
    compiled = engine.compile("nested")
    doc = document_tokens(tokenizer, "nested")
    m = engine.matcher(compiled)
    for t in doc[:10]:
        engine.accept(m, t)
    draft = doc[10 : 10 + k]
    acc, rb, chk = [], [], []
    for _ in range(repeats):
        start = time.perf_counter()
        for t in draft:
            assert engine.accept(m, t)
        acc.append((time.perf_counter() - start) * 1e6 / k)
        _, t = timed(engine.rollback, m, k)
        rb.append(t * 1000)
        n, t = timed(engine.check_draft, m, draft)
        assert n == k
        chk.append(t * 1000)
    bad = draft[:2] + [tokenizer.convert_tokens_to_ids("<|im_start|>")] + draft[2:]
    n = engine.check_draft(m, bad)
    med = statistics.median
    return {"accept_us": med(acc), "rollback_us": med(rb), "check_draft_us": med(chk), "bad_draft_prefix": n}


def termination(engine, tokenizer) -> list[str]:
    """What the mask allows once a document is complete, what EOS does, what a wrong token does."""
    lines = []
    eos = tokenizer.eos_token_id
    bitmask = engine.bitmask(1)

    def allowed() -> list[int]:
        engine.fill_one(m, bitmask, 0)
        bits = ((bitmask[0].unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1).view(-1)[: engine.vocab]
        return bits.nonzero().squeeze(-1).tolist()

    m = engine.matcher(engine.compile("enum+ranges"))
    for t in document_tokens(tokenizer, "enum+ranges")[:-1]:
        assert engine.accept(m, t)
    a = allowed()
    lines.append(f"document complete: mask allows {len(a)} token(s) {a[:5]}; {engine.describe(m)}")
    ok = engine.accept(m, eos)
    lines.append(f"accept EOS -> {ok}; {engine.describe(m)}")
    ok = engine.accept(m, tokenizer.convert_tokens_to_ids("a"))
    lines.append(f"accept 'a' after EOS -> {ok}; {engine.describe(m)}")

    m = engine.matcher(engine.compile("json_object"))
    a = allowed()
    lines.append(f"json_object start: {len(a)} tokens allowed, EOS allowed: {eos in a}")
    wrong = tokenizer("hello", add_special_tokens=False)["input_ids"][0]
    ok = engine.accept(m, wrong)
    lines.append(f"accept a wrong token -> {ok}; {engine.describe(m)}")
    ok = engine.accept(m, tokenizer("{", add_special_tokens=False)["input_ids"][0])
    lines.append(f"then a right one ('{{') -> {ok}; {engine.describe(m)}")
    try:
        engine.rollback(m, 1)
        lines.append(f"rollback(1) after that -> {engine.describe(m)}")
    except Exception as e:  # noqa: BLE001
        lines.append(f"rollback(1) after that raised {e!r}")

    # A document that is complete but could go on: '{"a": 1' ... with json_object, '{}' ends it.
    m = engine.matcher(engine.compile("regex"))
    for t in tokenizer("2024-11-30T07:22:15", add_special_tokens=False)["input_ids"]:
        assert engine.accept(m, t)
    a = allowed()
    lines.append(f"regex one char before its end: {len(a)} allowed ({[tokenizer.decode([t]) for t in a[:5]]})")
    return lines


def measure_serve_app(tokenizer, rows: int, steps: int) -> list[str]:
    """apply_masks(logits, rows, states) + one accept per row, for all rows constrained, a
    quarter of them, and none; rows walk the nested document as in (b)."""
    from serve_app.engine.grammar import GrammarCompiler, apply_masks
    from serve_app.engine.grammar_spec import GrammarSpec

    compiler = GrammarCompiler(tokenizer)
    compiled = compiler.compile_now(GrammarSpec.json_schema(SCHEMAS["nested"]))
    doc = document_tokens(tokenizer, "nested")
    logits = torch.randn(rows, len(tokenizer))
    lines = ["| constrained rows | apply_masks | accept (all rows) | state per sequence |", "|---:|---:|---:|---:|"]
    for constrained in (rows, rows // 4, 0):
        picked = list(range(0, rows, rows // constrained))[:constrained] if constrained else []
        states, pos = [], []
        for i in range(len(picked)):
            state = compiled.new_state()
            start = (i * 7) % (len(doc) - 1)
            for t in doc[:start]:
                assert state.accept(t)
            states.append(state)
            pos.append(start)
        mask_ms, accept_ms = [], []
        for _ in range(steps):
            work = logits.clone()
            mask_ms.append(timed(apply_masks, work, picked, states)[1])
            start = time.perf_counter()
            for i, state in enumerate(states):
                assert state.accept(doc[pos[i]])
                pos[i] += 1
                if pos[i] == len(doc):
                    states[i], pos[i] = compiled.new_state(), 0
            accept_ms.append((time.perf_counter() - start) * 1000)
        new_us = timed(lambda: [compiled.new_state() for _ in range(100)])[1] * 10
        lines.append(f"| {constrained} | {statistics.median(mask_ms):.2f} / {min(mask_ms):.2f} | "
                     f"{statistics.median(accept_ms):.2f} / {min(accept_ms):.2f} | {new_us:.1f} us |")
    compiler.close()
    return lines


def apply_variants():
    yield "plain torch, shift by 0..31 + masked_fill", unpack_bitmask_apply
    yield "plain torch, 256-entry byte table + masked_fill", lut_bitmask_apply
    try:
        import xgrammar

        yield "xgrammar.apply_token_bitmask_inplace (its C++ CPU kernel)", xgrammar.apply_token_bitmask_inplace
    except ImportError:
        pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--threads", type=int, default=1, help="mask threads (this machine has 2 shared cores)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--engines", default="xgrammar,llguidance")
    args = ap.parse_args()
    torch.set_num_threads(1)
    tokenizer = load_tokenizer()
    engines = []
    for name in args.engines.split(","):
        cls = {"xgrammar": XGrammarEngine, "llguidance": LLGuidanceEngine}[name]
        start = time.perf_counter()
        try:
            engines.append(cls(tokenizer, args.threads))
        except ImportError as e:
            print(f"{name}: not installed ({e})")
            continue
        print(f"{name}: tokenizer setup {engines[-1].tokenizer_ms:.0f} ms "
              f"(with import: {(time.perf_counter() - start) * 1000:.0f} ms)")

    print("\n## (a) compile + first mask, ms (median of", args.repeats, "cold runs)\n")
    res = {e.name: measure_compile(e, GRAMMARS, args.repeats) for e in engines}
    print("| grammar | " + " | ".join(e.name for e in engines) + " |")
    print("|---|" + "---:|" * len(engines))
    for kind in GRAMMARS:
        print(f"| {kind} | " + " | ".join(f"{res[e.name][kind]:.1f}" for e in engines) + " |")

    print(f"\n## (b) per step, {args.rows} rows each with its own matcher, ms (median of {args.steps} steps)\n")
    print("median / min; fill = the [rows, vocab/32] bitmask of every row; accept = one token per row\n")
    print("| grammar | engine | fill (batched call) | fill (row by row) | accept |")
    print("|---|---|---:|---:|---:|")
    masks = []
    for kind in GRAMMARS:
        for e in engines:
            r = measure_steps(e, tokenizer, kind, args.rows, args.steps)
            masks.append(r["bitmask"])
            print(f"| {kind} | {e.name} | {r['fill']:.2f} / {r['fill_min']:.2f} | "
                  f"{r['fill_serial']:.2f} / {r['fill_serial_min']:.2f} | {r['accept']:.2f} / {r['accept_min']:.2f} |")
    logits = torch.randn(args.rows, len(tokenizer))
    bm = masks[len(masks) // 2]  # a real step's masks (any engine: the bitmask format is the same)
    expected = logits.clone()
    unpack_bitmask_apply(expected, bm)
    print(f"\napplying one [{args.rows}, {len(tokenizer)}] bitmask (median / min of 30, ms):")
    for name, fn in apply_variants():
        ts = []
        for _ in range(30):
            w = logits.clone()
            ts.append(timed(fn, w, bm)[1])
        assert torch.equal(w, expected), name
        print(f"- {name}: {statistics.median(ts):.2f} / {min(ts):.2f}")
    rows4 = torch.arange(0, args.rows, max(1, args.rows // 4))
    ts = []
    for _ in range(30):
        w = logits.clone()
        start = time.perf_counter()
        sub = w.index_select(0, rows4)
        lut_bitmask_apply(sub, bm.index_select(0, rows4))
        w.index_copy_(0, rows4, sub)
        ts.append((time.perf_counter() - start) * 1000)
    print(f"- byte table, only {len(rows4)} of the {args.rows} rows constrained: "
          f"{statistics.median(ts):.2f} / {min(ts):.2f}")
    ts = [timed(logits.clone)[1] for _ in range(20)]
    print(f"(the clone of the logits inside each apply figure: {statistics.median(ts):.2f} ms)")

    print("\n## (c) speculation: per token accept, rollback(k), check a k-token draft, us\n")
    print("| engine | k | accept / token | rollback(k) | check draft (state kept) | bad draft: prefix kept |")
    print("|---|---:|---:|---:|---:|---:|")
    for e in engines:
        for k in (1, 4, 8):
            r = measure_rollback(e, tokenizer, k, 50)
            print(f"| {e.name} | {k} | {r['accept_us']:.1f} | {r['rollback_us']:.1f} | {r['check_draft_us']:.1f} "
                  f"| {r['bad_draft_prefix']} |")

    print(f"\n## serve_app.engine.grammar, as the sampler will call it: {args.rows} rows, ms (median / min)\n")
    for line in measure_serve_app(tokenizer, args.rows, args.steps):
        print(line)

    print("\n## (d) termination and dead ends\n")
    for e in engines:
        print(f"{e.name}:")
        for line in termination(e, tokenizer):
            print("  -", line)


if __name__ == "__main__":
    main()
