"""OpenAI's embeddings API on top of an embedding backend.

Validates and tokenizes `/v1/embeddings` bodies (the four shapes of `input`, limits,
truncation, `dimensions`) and turns the backend's vectors into OpenAI's response, as
floats or as base64 of little-endian float32. Plain Python: the ingress adds HTTP and
the backend (admission by the model's Router, vectors from an embedding replica).
"""

from __future__ import annotations

import asyncio
import base64
import contextvars
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from serve_app.config import ModelServingArgs
from serve_app.engine.embedding import EmbeddingSpec
from serve_app.frontend import parse_body
from serve_app.protocol import (
    APIError, EmbeddingData, EmbeddingRequest, EmbeddingResponse, EmbeddingUsage, ModelCard, new_id, now,
)

_SHAPES = "a string, a list of strings, a list of token ids, or a list of token-id lists"


class EmbeddingBackend(Protocol):
    async def embed(self, inputs: list[list[int]]) -> np.ndarray:
        """One vector per token-id list: [len(inputs), dimensions] float32."""


@dataclass
class PreparedEmbedding:
    """A validated request: its OpenAI form and the token ids to embed."""

    body: EmbeddingRequest
    inputs: list[list[int]]

    @property
    def prompt_tokens(self) -> int:
        return sum(len(ids) for ids in self.inputs)


class EmbeddingFrontend:
    def __init__(self, args: ModelServingArgs, tokenizer, spec: EmbeddingSpec, backend: EmbeddingBackend):
        self.args = args
        self.tokenizer = tokenizer
        self.spec = spec
        self.backend = backend

    @property
    def model_name(self) -> str:
        return self.args.model_name

    @property
    def max_model_len(self) -> int:
        return self.spec.max_model_len

    def card(self, created: int) -> ModelCard:
        return ModelCard(id=self.model_name, created=created, max_model_len=self.spec.max_model_len, task="embed",
                         dimensions=self.spec.dimensions)

    # ------------------------------------------------------------ preparing

    def prepare(self, body: Any) -> PreparedEmbedding:
        req = parse_body(EmbeddingRequest, body)
        if req.model != self.model_name:
            raise APIError(404, f"The model '{req.model}' does not exist; this server serves '{self.model_name}'",
                           param="model", code="model_not_found")
        if req.dimensions is not None:
            problem = self.spec.check_dimensions(req.dimensions)
            if problem:
                raise APIError(400, f"Invalid value for 'dimensions' ({req.dimensions}): {problem}",
                               param="dimensions", code="invalid_value")
        limit = self._token_limit(req)
        texts, token_lists = self._split_input(req.input)
        if texts is not None:
            inputs = self._encode(texts, req, limit)
        else:
            inputs = [self._check_ids(ids, f"input.{i}" if len(token_lists) > 1 or _nested(req.input) else "input",
                                      limit) for i, ids in enumerate(token_lists)]
        return PreparedEmbedding(req, inputs)

    def _token_limit(self, req: EmbeddingRequest) -> int | None:
        """The truncation length asked for, or None (inputs over the model's limit are refused)."""
        k = req.truncate_prompt_tokens
        if k is None:
            return None
        if k == -1:
            return self.spec.max_model_len
        if k > self.spec.max_model_len:
            raise APIError(400, f"truncate_prompt_tokens ({k}) is more than this model's {self.spec.max_model_len} "
                                "tokens per input", param="truncate_prompt_tokens", code="invalid_value")
        return k

    def _split_input(self, value: Any) -> tuple[list[str] | None, list[list[int]] | None]:
        """(texts, None) or (None, token-id lists), or a 400 naming the first bad item."""
        if isinstance(value, str):
            items: list = [value]
        elif isinstance(value, list):
            items = value
            if not items:
                raise APIError(400, "'input' must not be an empty list", param="input", code="invalid_value")
        else:
            raise APIError(400, f"Invalid value for 'input': expected {_SHAPES}", param="input",
                           code="invalid_value")
        if len(items) > self.args.max_embedding_inputs and not _is_id(items[0]):
            raise APIError(400, f"'input' has {len(items)} items; this server embeds at most "
                                f"{self.args.max_embedding_inputs} per request", param="input",
                           code="too_many_inputs")
        first = items[0]
        if isinstance(value, list) and _is_id(first):  # one input given as token ids
            for i, item in enumerate(items):
                if not _is_id(item):
                    raise APIError(400, f"Invalid value for 'input.{i}': a list of token ids holds integers only",
                                   param=f"input.{i}", code="invalid_value")
            return None, [items]
        kind = str if isinstance(first, str) else list if isinstance(first, list) else None
        for i, item in enumerate(items):
            if kind is None or not isinstance(item, kind):
                raise APIError(400, f"Invalid value for 'input.{i}': expected {_SHAPES} (all items of one kind)",
                               param=f"input.{i}" if isinstance(value, list) else "input", code="invalid_value")
            if kind is str and not item:
                param = f"input.{i}" if isinstance(value, list) else "input"
                raise APIError(400, f"'{param}' must not be an empty string", param=param, code="invalid_value")
        if kind is str:
            return items, None
        for i, ids in enumerate(items):
            for j, token in enumerate(ids):
                if not _is_id(token):
                    raise APIError(400, f"Invalid value for 'input.{i}.{j}': token ids are integers",
                                   param=f"input.{i}", code="invalid_value")
        return None, items

    def _encode(self, texts: list[str], req: EmbeddingRequest, limit: int | None) -> list[list[int]]:
        single = isinstance(req.input, str)
        if limit is None:
            # A text longer than this many characters cannot fit (a token is rarely under one
            # character): refuse it before paying for its tokenization.
            for i, text in enumerate(texts):
                if len(text) > 64 * self.spec.max_model_len:
                    param = "input" if single else f"input.{i}"
                    raise APIError(400, f"'{param}' is {len(text)} characters long, far more than the "
                                        f"{self.spec.max_model_len} tokens this model embeds", param=param,
                                   code="context_length_exceeded")
        if self.spec.lowercase:
            texts = [t.lower() for t in texts]
        encoded = self.tokenizer(texts, add_special_tokens=req.add_special_tokens, truncation=limit is not None,
                                 max_length=limit)["input_ids"]
        for i, ids in enumerate(encoded):
            param = "input" if single else f"input.{i}"
            if not ids:
                raise APIError(400, f"'{param}' has no tokens", param=param, code="invalid_value")
            self._check_length(ids, param)
        return encoded

    def _check_ids(self, ids: list[int], param: str, limit: int | None) -> list[int]:
        if not ids:
            raise APIError(400, f"'{param}' must not be an empty list of token ids", param=param,
                           code="invalid_value")
        vocab = self.spec.vocab_size
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise APIError(400, f"'{param}' holds token id {bad}, outside this model's vocabulary (0..{vocab - 1})",
                           param=param, code="invalid_value")
        if limit is not None:
            ids = ids[:limit]
        self._check_length(ids, param)
        return ids

    def _check_length(self, ids: list[int], param: str) -> None:
        if len(ids) > self.spec.max_model_len:
            raise APIError(400, f"'{param}' is {len(ids)} tokens long; this model embeds at most "
                                f"{self.spec.max_model_len} tokens per input (or ask for truncation with "
                                "truncate_prompt_tokens)", param=param, code="context_length_exceeded")

    # ------------------------------------------------------------ running

    async def embeddings(self, prepared: PreparedEmbedding) -> dict:
        vectors = await self.backend.embed(prepared.inputs)
        return self.response(prepared, vectors)

    def response(self, prepared: PreparedEmbedding, vectors: np.ndarray) -> dict:
        """OpenAI's response for these vectors (shortened to `dimensions` when asked)."""
        req = prepared.body
        if req.dimensions is not None and req.dimensions < vectors.shape[1]:
            vectors = vectors[:, : req.dimensions]
            if self.spec.normalize:  # a Matryoshka prefix of a unit vector is re-normalized, as vLLM does
                vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        if req.encoding_format == "base64":
            little = vectors.astype("<f4", copy=False)
            data = [base64.b64encode(row.tobytes()).decode("ascii") for row in little]
        else:
            data = vectors.tolist()
        tokens = prepared.prompt_tokens
        return EmbeddingResponse(
            id=new_id("embd"), created=now(), model=self.model_name,
            data=[EmbeddingData(index=i, embedding=v) for i, v in enumerate(data)],
            usage=EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens),
        ).model_dump()


@dataclass(eq=False)
class _Waiting:
    inputs: list[list[int]]
    future: asyncio.Future
    group: _Group | None = None


@dataclass(eq=False)
class _Group:
    members: list[_Waiting] = field(default_factory=list)
    task: asyncio.Task | None = None


class CoalescingBackend:
    """Requests that wait together travel together: one admission and one replica call per
    group, not per request.

    A request is sent at once while fewer than `max_groups_in_flight` groups are out;
    otherwise it waits, and when a group comes back everything that waited goes as the next
    group (up to `max_inputs` inputs; a larger request goes alone). Two groups out keep the
    next one queued at the replica while it computes the current one. At most `max_inputs`
    inputs wait here: beyond that a group goes at once, so that queueing, and 429 when it is
    full, stays the Router's. Each request gets its own rows back; a group's error is each
    member's error; a group whose callers all left is cancelled (at the replica too), and a
    request that leaves before its group is sent is dropped from it.
    """

    def __init__(self, send: Callable[[list[list[int]]], Awaitable[np.ndarray]], max_inputs: int,
                 max_groups_in_flight: int = 2):
        self._send = send
        self.max_inputs = max_inputs
        self.max_groups_in_flight = max_groups_in_flight
        self._waiting: list[_Waiting] = []
        self._in_flight = 0
        self.groups_sent = 0

    async def embed(self, inputs: list[list[int]]) -> np.ndarray:
        entry = _Waiting(inputs, asyncio.get_running_loop().create_future())
        self._waiting.append(entry)
        self._dispatch()
        try:
            return await entry.future
        except asyncio.CancelledError:
            if entry.group is None:
                self._waiting.remove(entry)
            elif all(m.future.done() for m in entry.group.members) and entry.group.task is not None:
                entry.group.task.cancel()  # nobody waits for this group any more
            raise

    def _dispatch(self) -> None:
        while self._waiting and (self._in_flight < self.max_groups_in_flight
                                 or sum(len(w.inputs) for w in self._waiting) >= self.max_inputs):
            group, size = _Group(), 0
            while self._waiting and (not group.members or size + len(self._waiting[0].inputs) <= self.max_inputs):
                entry = self._waiting.pop(0)
                entry.group = group
                group.members.append(entry)
                size += len(entry.inputs)
            self._in_flight += 1
            self.groups_sent += 1
            # In an empty context: the group belongs to no one request, and the cancellation of
            # the request that happened to send it (Ray Serve cancels a request's calls) must
            # not cancel it for the others.
            group.task = contextvars.Context().run(asyncio.get_running_loop().create_task, self._run(group))

    async def _run(self, group: _Group) -> None:
        try:
            vectors = await self._send([ids for m in group.members for ids in m.inputs])
            start = 0
            for m in group.members:
                if not m.future.done():
                    m.future.set_result(vectors[start:start + len(m.inputs)])
                start += len(m.inputs)
        except asyncio.CancelledError:
            pass  # every member left
        except Exception as e:  # an APIError (429, 503, ...) or a failure: each member's answer
            for m in group.members:
                if not m.future.done():
                    m.future.set_exception(e)
        finally:
            self._in_flight -= 1
            self._dispatch()


def _is_id(value: Any) -> bool:
    return type(value) is int  # not bool, not float


def _nested(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and isinstance(value[0], list)
