"""OpenAI semantics on top of a generation backend.

Turns request bodies into validated, tokenized `GenerationRequest`s (chat
template, context-length checks, defaults) and engine outputs into OpenAI
responses and stream chunks. Plain Python: the ingress deployment adds HTTP;
unit tests plug in any backend.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, replace
from typing import Any, Protocol

from pydantic import BaseModel, ValidationError

from serve_app.config import ModelServingArgs
from serve_app.engine.grammar_spec import DEAD_END, GrammarSpec
from serve_app.engine.types import GenerationRequest, SamplingParams, SequenceOutput
from serve_app.protocol import (
    APIError, AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionRequest,
    ChatCompletionResponse, ChatDelta, CompletionChoice, CompletionRequest, CompletionResponse,
    GenerateRequest, ModelCard, ModelList, Usage, new_id, now,
)
from serve_app.structured_output import output_grammar, tool_context
from serve_app.tool_calls import (
    ToolCallParser, ToolContext, parse_output, template_messages, template_supports_tools,
)


class Backend(Protocol):
    def stream(self, requests: list[GenerationRequest]) -> AsyncIterator[list[SequenceOutput]]:
        """Run these requests together; yield lists of output deltas until every one has finished."""


def parse_body(model_cls: type[BaseModel], body: Any) -> BaseModel:
    """Validate a JSON body; the first problem becomes a 400 naming its field."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_body")
    check_text(body)
    try:
        return model_cls.model_validate(body)
    except ValidationError as e:
        err = e.errors()[0]
        param = ".".join(str(p) for p in err["loc"] if not _is_union_tag(p)) or None
        if err["type"] == "extra_forbidden":
            raise APIError(400, f"Unrecognized request argument supplied: {param}", param=param,
                           code="unsupported_parameter") from None
        if err["type"] == "missing":
            raise APIError(400, f"'{param}' is a required property", param=param, code="missing_field") from None
        raise APIError(400, f"Invalid value for '{param}': {err['msg']}", param=param,
                       code="invalid_value") from None


MAX_JSON_DEPTH = 32  # no field of the API nests deeper than a few levels


def check_text(value: Any, path: str = "", depth: int = 0) -> None:
    """Every string must be encodable text (JSON allows lone UTF-16 surrogates, which
    no tokenizer accepts), and nothing nests absurdly deep: 400 naming the field."""
    if depth > MAX_JSON_DEPTH:
        raise APIError(400, f"the request body nests deeper than {MAX_JSON_DEPTH} levels at '{path}'",
                       param=path or None, code="invalid_body")
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise APIError(400, f"Invalid value for '{path or 'body'}': not valid Unicode text "
                                "(a lone UTF-16 surrogate)", param=path or None, code="invalid_value") from None
    elif isinstance(value, dict):
        for key, item in value.items():
            check_text(key, path, depth + 1)
            check_text(item, f"{path}.{key}" if path else str(key), depth + 1)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            check_text(item, f"{path}.{i}", depth + 1)


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "json-or-python"}


def _is_union_tag(part) -> bool:
    """pydantic names the union member that failed (`str`, `list[str]`) in `loc`: not a field."""
    return isinstance(part, str) and (part in _TYPE_TAGS or "[" in part or part.startswith("function-"))


@dataclass
class Prepared:
    """A validated request, ready to run: its OpenAI form and its engine form."""

    body: CompletionRequest | ChatCompletionRequest
    requests: list[GenerationRequest]
    response_id: str
    tools: ToolContext | None = None  # chat with tools the model may call: its answers are parsed for calls


class OpenAIFrontend:
    """Completions, chat and /generate for one generation model."""

    def __init__(self, args: ModelServingArgs, tokenizer, max_model_len: int, backend: Backend):
        self.args = args
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.backend = backend
        self.created = now()
        self._grammars = None  # GrammarCompiler, made at the first constrained request
        self._template_tools: bool | None = None

    @property
    def model_name(self) -> str:
        return self.args.model_name

    def card(self, created: int) -> ModelCard:
        return ModelCard(id=self.args.model_name, created=created, max_model_len=self.max_model_len,
                         task="generate")

    def models(self) -> dict:
        return ModelList(data=[self.card(self.created)]).model_dump(exclude_none=True)

    # ------------------------------------------------------------ preparing

    def prepare_completion(self, body: Any, tenant: str = "") -> Prepared:
        """`tenant`: who is asking, when tenants must not share cached prompts (see cache_salt_of)."""
        req = parse_body(CompletionRequest, body)
        self._check_common(req)
        self._check_sequences(len(req.prompts), req.n)
        rid = new_id("cmpl")
        grammar = self._output_grammar(req, None)
        ids = [self._encode(p, "prompt") for p in req.prompts]
        # Choice index i * n + j: prompt i, sample j (OpenAI's order).
        return Prepared(req, [self._engine_request(f"{rid}-{i * req.n + j}", t, req, req.max_tokens, j, req.logprobs,
                                                   grammar, tenant)
                              for i, t in enumerate(ids) for j in range(req.n)], rid)

    def prepare_chat(self, body: Any, tenant: str = "") -> Prepared:
        req = parse_body(ChatCompletionRequest, body)
        self._check_common(req)
        if len(req.messages) > self.args.max_messages:
            raise APIError(400, f"'messages' has {len(req.messages)} messages; this server accepts at most "
                                f"{self.args.max_messages}", param="messages", code="too_many_messages")
        if not getattr(self.tokenizer, "chat_template", None):
            raise APIError(400, f"model {self.args.model_name!r} has no chat template; use /v1/completions",
                           param="messages", code="no_chat_template")
        self._check_sequences(None, req.n)
        if req.top_logprobs and not req.logprobs:
            raise APIError(400, "'top_logprobs' requires 'logprobs': true", param="top_logprobs")
        tools = tool_context(req, self.args)
        grammar = self._output_grammar(req, tools)
        if tools is not None and grammar is not None and grammar.kind == "tool_calls" and grammar.value:
            tools = replace(tools, json_answer=True)
        ids = self._encode_chat(req, tools)
        self._check_prompt_length(ids, "messages")
        rid = new_id("chatcmpl")
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        return Prepared(req, [self._engine_request(f"{rid}-{j}", ids, req, req.requested_max_tokens, j, logprobs,
                                                   grammar, tenant)
                              for j in range(req.n)], rid, tools)

    # ------------------------------------------------------------ structured output and tools

    @property
    def grammars(self):
        """This process's GrammarCompiler (for validation: the replica compiles for itself)."""
        if self._grammars is None:
            from serve_app.engine.grammar import GrammarCompiler  # torch + llguidance: only once needed

            self._grammars = GrammarCompiler(self.tokenizer, cache_size=self.args.grammar_cache_size)
        return self._grammars

    def _output_grammar(self, req, tools: ToolContext | None) -> GrammarSpec | None:
        """The request's grammar, compiled once here so that an invalid one is a 400 naming its field."""
        if tools is not None:
            for i, tool in enumerate(tools.tools):
                if tool.function.parameters is not None:
                    self._check_grammar(GrammarSpec.json_schema(tool.function.parameters),
                                        f"tools.{i}.function.parameters")
        found = output_grammar(req, tools, self.args)
        if found is None:
            return None
        spec, param = found
        self._check_grammar(spec, param)
        return spec

    def _check_grammar(self, spec: GrammarSpec, param: str) -> None:
        from serve_app.engine.grammar import GrammarError

        try:
            self.grammars.compile_now(spec, timeout=60)
        except GrammarError as e:
            raise APIError(400, f"Invalid '{param}': {e}", param=param,
                           code="invalid_schema" if spec.kind in ("json_schema", "tool_calls") else "invalid_grammar"
                           ) from None
        except TimeoutError:
            raise APIError(400, f"'{param}' took too long to compile", param=param, code="invalid_grammar") from None

    def _encode_chat(self, req: ChatCompletionRequest, tools: ToolContext | None) -> list[int]:
        if tools is None and not any(m.tool_calls or m.role == "tool" for m in req.messages):
            return encode_chat(self.tokenizer, [{"role": m.role, "content": m.text()} for m in req.messages])
        if self._template_tools is None:
            self._template_tools = template_supports_tools(self.tokenizer)
        messages, tool_list = template_messages(req.messages, tools, self._template_tools)
        if tool_list is not None or self._template_tools:
            # The template renders these strings itself (not as placeholders): no control tokens in them.
            rendered = json.dumps([tool_list, [m.get("tool_calls") for m in messages]], ensure_ascii=False)
            if any(t in rendered for t in control_tokens(self.tokenizer)):
                raise APIError(400, "tools or tool calls contain the model's control tokens", param="tools",
                               code="invalid_value")
        return encode_chat(self.tokenizer, messages, tool_list)

    def prepare_generate(self, body: Any) -> GenerationRequest:
        req = parse_body(GenerateRequest, body)
        ids = self._encode(req.prompt, "prompt")
        return self._make_request(new_id("gen"), ids, SamplingParams(max_tokens=req.max_length, temperature=0),
                                  "max_length")

    def _check_common(self, req: CompletionRequest | ChatCompletionRequest) -> None:
        if req.model != self.args.model_name:
            raise APIError(404, f"The model '{req.model}' does not exist; this server serves "
                                f"'{self.args.model_name}'", param="model", code="model_not_found")
        req.check_supported()
        for s in req.stop:
            if len(s) > self.args.max_stop_chars:
                raise APIError(400, f"a stop string is {len(s)} characters long; at most "
                                    f"{self.args.max_stop_chars} are allowed", param="stop", code="stop_too_long")

    def _check_sequences(self, prompts: int | None, n: int) -> None:
        """One request's sequences (prompts x n; a chat has no prompt list) within
        max_prompts_per_request, or 400 naming what to lower."""
        limit = self.args.max_prompts_per_request
        if (prompts or 1) * n <= limit:
            return
        if prompts is None:
            raise APIError(400, f"n={n}: this server generates at most {limit} choices per request", param="n",
                           code="too_many_prompts")
        raise APIError(400, f"{prompts} prompts x n={n} is {prompts * n} sequences; this server accepts at most "
                            f"{limit} per request", param="prompt" if n == 1 else "n", code="too_many_prompts")

    @property
    def max_prompt_tokens(self) -> int:
        return min(self.args.max_prompt_tokens or self.max_model_len, self.max_model_len - 1)

    def _check_prompt_length(self, ids: list[int], param: str) -> None:
        if len(ids) > self.max_prompt_tokens:
            raise APIError(400, f"'{param}' is {len(ids)} tokens long; this server accepts at most "
                                f"{self.max_prompt_tokens} prompt tokens", param=param, code="context_length_exceeded")

    def _encode(self, text: str, param: str) -> list[int]:
        # A prompt longer than this many characters cannot fit in any case (a token is
        # rarely under one character): refuse it before paying for its tokenization.
        if len(text) > 64 * self.max_prompt_tokens:
            raise APIError(400, f"'{param}' is {len(text)} characters long, far more than the "
                                f"{self.max_prompt_tokens} prompt tokens this server accepts", param=param,
                           code="context_length_exceeded")
        ids = self.tokenizer(text, add_special_tokens=True)["input_ids"]
        if not ids:
            if self.tokenizer.bos_token_id is None:
                raise APIError(400, f"'{param}' must not be empty", param=param)
            ids = [self.tokenizer.bos_token_id]
        self._check_prompt_length(ids, param)
        return ids

    def _engine_request(self, rid: str, ids: list[int], req, max_tokens: int | None, choice: int = 0,
                        logprobs: int | None = None, grammar: GrammarSpec | None = None,
                        tenant: str = "") -> GenerationRequest:
        room = self.max_model_len - len(ids)
        if max_tokens is None:
            max_tokens = max(1, min(self.args.max_tokens_default, room))
        if req.min_tokens > max_tokens:
            raise APIError(400, f"min_tokens ({req.min_tokens}) is more than max_tokens ({max_tokens})",
                           param="min_tokens")
        vocab = len(self.tokenizer)
        # top_k at or past the vocabulary keeps every token: the same as off.
        top_k = req.top_k if req.top_k < vocab else 0
        bias = {int(k): v for k, v in (req.logit_bias or {}).items()}
        if any(k >= vocab for k in bias):
            raise APIError(400, f"logit_bias names a token id outside the vocabulary (0..{vocab - 1})",
                           param="logit_bias", code="invalid_value")
        # Choice j of a seeded request: its own stream of the same seed, so n choices differ
        # and each replays exactly.
        seed = None if req.seed is None else (req.seed + choice) % 2**64
        params = SamplingParams(
            max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, top_k=top_k,
            stop=tuple(req.stop), seed=seed, ignore_eos=req.ignore_eos, min_tokens=req.min_tokens,
            presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
            repetition_penalty=req.repetition_penalty, logit_bias=bias or None, logprobs=logprobs,
            grammar=grammar,
        )
        return self._make_request(rid, ids, params, "max_tokens", cache_salt_of(req.cache_salt, tenant))

    def _make_request(self, rid: str, ids: list[int], params: SamplingParams, max_param: str,
                      cache_salt: str | None = None) -> GenerationRequest:
        if len(ids) + params.max_tokens > self.max_model_len:
            raise APIError(
                400,
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{len(ids) + params.max_tokens} tokens ({len(ids)} in the prompt, {params.max_tokens} in the "
                f"completion). Please reduce the prompt or {max_param}.",
                param=max_param, code="context_length_exceeded",
            )
        return GenerationRequest(request_id=rid, prompt_token_ids=ids, params=params, cache_salt=cache_salt)

    # ------------------------------------------------------------ running

    async def _run_to_end(self, requests: list[GenerationRequest]) -> list[SequenceOutput]:
        finals = {r.request_id: SequenceOutput(r.request_id) for r in requests}
        async with aclosing(self.backend.stream(requests)) as stream:
            async for outputs in stream:
                for out in outputs:
                    finals[out.request_id].absorb(out)
        for out in finals.values():
            raise_if_failed(out)
        return list(finals.values())

    async def completion(self, prepared: Prepared) -> dict:
        outs = await self._run_to_end(prepared.requests)
        return CompletionResponse(
            id=prepared.response_id, created=now(), model=self.args.model_name,
            choices=[CompletionChoice(index=i, text=o.text, finish_reason=o.finish_reason,
                                      logprobs=self._completion_logprobs(o))
                     for i, o in enumerate(outs)],
            usage=total_usage(outs),
        ).model_dump()

    async def chat(self, prepared: Prepared) -> dict:
        outs = await self._run_to_end(prepared.requests)
        return ChatCompletionResponse(
            id=prepared.response_id, created=now(), model=self.args.model_name,
            choices=[self._chat_choice(i, o, prepared.tools) for i, o in enumerate(outs)],
            usage=total_usage(outs),
        ).model_dump()

    def _chat_choice(self, index: int, out: SequenceOutput, tools: ToolContext | None) -> ChatChoice:
        message, finish = AssistantMessage(content=out.text), out.finish_reason
        if tools is not None:
            parsed = parse_output(out.text, tools.names, bare_calls=not tools.json_answer)
            if parsed.tool_calls:
                message = AssistantMessage(content=parsed.content, tool_calls=parsed.tool_calls)
                finish = "tool_calls" if finish == "stop" else finish
        return ChatChoice(index=index, message=message, finish_reason=finish, logprobs=self._chat_logprobs(out))

    # ------------------------------------------------------------ logprobs

    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def _chat_logprobs(self, out: SequenceOutput) -> dict | None:
        """OpenAI chat form: {"content": [{token, logprob, bytes, top_logprobs: [...]}]}."""
        if out.logprobs is None:
            return None

        def entry(token_id: int, logprob: float) -> dict:
            text = self._token_text(token_id)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

        return {"content": [{**entry(t, lp), "top_logprobs": [entry(a, alp) for a, alp in top]}
                            for t, (lp, top) in zip(out.token_ids, out.logprobs)]}

    def _completion_logprobs(self, out: SequenceOutput, offset: int = 0) -> dict | None:
        """OpenAI completions form: tokens, token_logprobs, top_logprobs, text_offset."""
        if out.logprobs is None:
            return None
        tokens = [self._token_text(t) for t in out.token_ids]
        offsets = []
        for text in tokens:
            offsets.append(offset)
            offset += len(text)
        return {"tokens": tokens, "token_logprobs": [lp for lp, _ in out.logprobs],
                "top_logprobs": [{self._token_text(a): alp for a, alp in top} for _, top in out.logprobs],
                "text_offset": offsets}

    async def generate(self, request: GenerationRequest) -> dict:
        (out,) = await self._run_to_end([request])
        prompt = self.tokenizer.decode(request.prompt_token_ids, skip_special_tokens=True)
        return {"generated_text": prompt + out.text}

    async def completion_chunks(self, prepared: Prepared) -> AsyncIterator[dict]:
        """OpenAI `text_completion` chunks, one per output delta, then usage if asked."""
        finals: dict[int, SequenceOutput] = {}
        offsets: dict[int, int] = {}
        async with aclosing(indexed_outputs(self.backend, prepared.requests)) as outputs:
            async for index, out in outputs:
                raise_if_failed(out)
                if not out.text and not out.finished and out.logprobs is None:
                    continue
                if out.finished:
                    finals[index] = out
                logprobs = self._completion_logprobs(out, offsets.get(index, 0))
                offsets[index] = offsets.get(index, 0) + len(out.text)
                yield {"id": prepared.response_id, "object": "text_completion", "created": now(),
                       "model": self.args.model_name,
                       "choices": [{"index": index, "text": out.text, "finish_reason": out.finish_reason,
                                    "logprobs": logprobs}]}
        if _include_usage(prepared.body):
            yield {"id": prepared.response_id, "object": "text_completion", "created": now(),
                   "model": self.args.model_name, "choices": [],
                   "usage": total_usage(list(finals.values())).model_dump()}

    async def chat_chunks(self, prepared: Prepared) -> AsyncIterator[dict]:
        """OpenAI `chat.completion.chunk`s: a role chunk, content deltas, a finish chunk, usage if asked."""
        def chunk(delta: ChatDelta, index=0, finish=None, usage=None, choices=True, logprobs=None) -> dict:
            return ChatCompletionChunk(
                id=prepared.response_id, created=now(), model=self.args.model_name,
                choices=[ChatChunkChoice(index=index, delta=delta, finish_reason=finish, logprobs=logprobs)]
                if choices else [],
                usage=usage,
            ).model_dump(exclude_none=True)

        # Wait for the first output before the role chunks: a full queue must still be able
        # to answer with an HTTP 429, which is impossible once a chunk has been sent.
        finals: dict[int, SequenceOutput] = {}
        async with aclosing(indexed_outputs(self.backend, prepared.requests)) as outputs:
            first = await anext(outputs, None)
            for index in range(len(prepared.requests)):
                yield chunk(ChatDelta(role="assistant", content=""), index)
            # With tools, each choice's text goes through a parser that sends calls as
            # delta.tool_calls fragments and the rest as content.
            parsers = {} if prepared.tools is None else {
                i: ToolCallParser(prepared.tools.names, bare_calls=not prepared.tools.json_answer)
                for i in range(len(prepared.requests))}
            async for index, out in _prepend(first, outputs):
                raise_if_failed(out)
                if index in parsers:
                    logprobs = self._chat_logprobs(out)
                    events = parsers[index].feed(out.text) + (parsers[index].finish() if out.finished else [])
                    for kind, piece in events:
                        delta = ChatDelta(content=piece) if kind == "content" else ChatDelta(tool_calls=[piece])
                        yield chunk(delta, index, logprobs=logprobs)
                        logprobs = None
                    if logprobs:
                        yield chunk(ChatDelta(), index, logprobs=logprobs)
                elif out.text or out.logprobs:
                    yield chunk(ChatDelta(content=out.text), index, logprobs=self._chat_logprobs(out))
                if out.finished:
                    finals[index] = out
                    finish = out.finish_reason
                    if index in parsers and parsers[index].calls and finish == "stop":
                        finish = "tool_calls"
                    yield chunk(ChatDelta(), index, finish=finish)
        if _include_usage(prepared.body) and finals:
            yield chunk(ChatDelta(), usage=total_usage(list(finals.values())), choices=False)


class ServedModels:
    """The app's models by served name: which frontend answers a request's `model`.

    `frontends` maps each served name to its frontend (an `OpenAIFrontend` for a generation
    model, an `EmbeddingFrontend` for an embedding model), in the configured order.
    """

    def __init__(self, frontends: dict[str, Any], tasks: dict[str, str]):
        self.frontends = frontends
        self.tasks = tasks
        self.created = now()

    def models(self) -> dict:
        """`/v1/models`: every served model, with its context and (embedding models) dimensions."""
        return ModelList(data=[f.card(self.created) for f in self.frontends.values()]).model_dump(exclude_none=True)

    def first(self, task: str):
        """The first configured model of this task (the one `/generate` serves), or None."""
        return next((self.frontends[n] for n, t in self.tasks.items() if t == task), None)

    def for_body(self, body: Any, task: str):
        """The frontend for this request body's `model`, which must be served and do `task`:
        404 naming the served models, or 400 naming `model`."""
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object", code="invalid_body")
        if "model" not in body:
            raise APIError(400, "'model' is a required property", param="model", code="missing_field")
        name = body["model"]
        if not isinstance(name, str):
            raise APIError(400, "Invalid value for 'model': Input should be a valid string", param="model",
                           code="invalid_value")
        check_text(name, "model")
        frontend = self.frontends.get(name)
        if frontend is None:
            served = ", ".join(f"'{n}'" for n in self.frontends)
            raise APIError(404, f"The model '{name}' does not exist; this server serves {served}", param="model",
                           code="model_not_found")
        if self.tasks[name] != task:
            if task == "embed":
                message = f"model '{name}' generates text and cannot embed; embedding models here: "
            else:
                message = f"model '{name}' is an embedding model (use /v1/embeddings); generation models here: "
            others = [n for n, t in self.tasks.items() if t == task]
            raise APIError(400, message + (", ".join(f"'{n}'" for n in others) or "none"), param="model",
                           code="model_not_supported")
        return frontend


def encode_chat(tokenizer, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
    """Token ids of a conversation, with message contents tokenized as plain text.

    A user who types the model's control tokens (`<|im_start|>system ...`) must not
    get them parsed as control tokens: the template is rendered around placeholders,
    its own text tokenized normally and each content with special tokens split.
    Messages whose content is not text (None beside tool calls) keep it.
    """
    marks = {i: f"\x1fserve-app-content-{i}\x1f" for i, m in enumerate(messages) if isinstance(m["content"], str)}
    template = _render_chat(tokenizer, [{**m, "content": marks[i]} if i in marks else m
                                        for i, m in enumerate(messages)], tools)
    pieces = re.split("(" + "|".join(re.escape(m) for m in marks.values()) + ")", template) if marks else [template]
    if sorted(p for p in pieces if p in marks.values()) != sorted(marks.values()):
        # The template transforms contents (it did not keep each placeholder once): tokenize
        # the rendering as a whole, which is safe only when no content holds a control token.
        specials = control_tokens(tokenizer)
        if any(t in m["content"] for m in messages if isinstance(m["content"], str) for t in specials):
            raise APIError(400, "message content contains the model's control tokens", param="messages",
                           code="invalid_value")
        return tokenizer(_render_chat(tokenizer, messages, tools), add_special_tokens=False)["input_ids"]
    content = {marks[i]: messages[i]["content"] for i in marks}
    ids: list[int] = []
    for piece in pieces:
        if piece in content:
            if content[piece]:
                ids += tokenizer(content[piece], add_special_tokens=False, split_special_tokens=True)["input_ids"]
        elif piece:
            ids += tokenizer(piece, add_special_tokens=False)["input_ids"]
    return ids


def control_tokens(tokenizer) -> list[str]:
    """The texts the tokenizer turns into control tokens: its named special tokens and the
    added tokens marked special (`<|im_start|>` is only the latter in some tokenizers)."""
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return sorted({t for t in tokenizer.all_special_tokens if t}
                  | {t.content for t in added.values() if getattr(t, "special", False) and t.content})


def _render_chat(tokenizer, messages: list[dict], tools: list[dict] | None = None) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=False)
    except Exception as e:  # the template itself may reject a conversation (e.g. role order)
        raise APIError(400, f"the chat template rejected these messages: {e}", param="messages") from None


async def _prepend(first, rest: AsyncIterator) -> AsyncIterator:
    if first is not None:
        yield first
    async for item in rest:
        yield item


def cache_salt_of(request_salt: str | None, tenant: str) -> str | None:
    """What keeps a request's cached prompt blocks apart from others': its own `cache_salt`
    (vLLM's field) and, when the server salts by API key, who sent it. Requests with the same
    salt (none, by default) share blocks; a cache hit shows in the time to first token."""
    if not request_salt and not tenant:
        return None
    return f"{tenant}/{request_salt or ''}"


def raise_if_failed(out: SequenceOutput) -> None:
    if out.finish_reason == "error":
        if out.error and out.error.startswith(DEAD_END):
            raise APIError(500, out.error, type="server_error", code=DEAD_END)
        raise APIError(500, out.error or "generation failed", type="server_error", code="generation_failed")


def total_usage(outs: list[SequenceOutput]) -> Usage:
    return Usage.of(sum(o.prompt_tokens for o in outs), sum(o.completion_tokens for o in outs),
                    sum(o.cached_tokens for o in outs))


def _include_usage(body) -> bool:
    return bool(body.stream_options and body.stream_options.include_usage)


async def indexed_outputs(backend: Backend, requests: list[GenerationRequest]) -> AsyncIterator[tuple[int, SequenceOutput]]:
    """The requests' output deltas, each with the index of its request (its choice index)."""
    index = {r.request_id: i for i, r in enumerate(requests)}
    async with aclosing(backend.stream(requests)) as stream:
        async for outputs in stream:
            for out in outputs:
                yield index[out.request_id], out
