"""The design serve_app replaces: one FastAPI/uvicorn process calling
`model.generate` for each request, one at a time (as in the seed document),
wearing OpenAI's /v1/completions shape so the same load generator drives it.

    python -m bench.baselines.naive_server --model builtin:smollm2-135m-instruct --port 8100
"""

from __future__ import annotations

import argparse

import torch
import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel

from serve_app.engine.loading import load_model


class Generation(BaseModel):
    model: str
    max_tokens: int = 16
    temperature: float = 0.0
    stream: bool = False
    ignore_eos: bool = False


class Completion(Generation):
    prompt: str


class ChatCompletion(Generation):
    messages: list[dict]


def build(model_name: str, dtype: str = "auto") -> FastAPI:
    model, tokenizer = load_model(model_name, dtype)
    app = FastAPI()

    def generate(ids: dict, req: Generation) -> tuple[str, dict]:
        # As in the seed document: `async def` calling generate blocks the event loop,
        # so requests are served strictly one at a time.
        with torch.inference_mode():
            out = model.generate(**ids, max_new_tokens=req.max_tokens, do_sample=False,
                                 min_new_tokens=req.max_tokens if req.ignore_eos else 0,
                                 pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        new = out[0, ids["input_ids"].shape[1]:]
        usage = {"prompt_tokens": ids["input_ids"].shape[1], "completion_tokens": len(new),
                 "total_tokens": ids["input_ids"].shape[1] + len(new)}
        return tokenizer.decode(new, skip_special_tokens=True), usage

    @app.post("/v1/completions")
    async def completions(req: Completion) -> dict:
        text, usage = generate(tokenizer(req.prompt, return_tensors="pt"), req)
        return {"object": "text_completion", "model": req.model,
                "choices": [{"index": 0, "text": text, "finish_reason": "length"}], "usage": usage}

    @app.post("/v1/chat/completions")
    async def chat(req: ChatCompletion) -> dict:
        ids = tokenizer.apply_chat_template(req.messages, add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)
        text, usage = generate(ids, req)
        return {"object": "chat.completion", "model": req.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": "stop"}], "usage": usage}

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok"}

    return app


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="builtin:smollm2-135m-instruct")
    p.add_argument("--port", type=int, default=8100)
    p.add_argument("--dtype", default="auto")
    a = p.parse_args()
    uvicorn.run(build(a.model, a.dtype), host="127.0.0.1", port=a.port, log_level="warning")
