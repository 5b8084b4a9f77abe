"""`serve-app`: talk to a running app from a shell.

    serve-app chat                      interactive, streaming
    serve-app complete "Once upon a"    one completion, streamed to stdout
    serve-app embed "text" ...          embeddings as JSON lines; --query Q ranks the texts instead
    serve-app status                    each model: replicas, devices, load
    serve-app bench [--quick ...]       the benchmark (bench/run.py)

The server is `--url` or $SERVE_APP_URL (default http://127.0.0.1:8000); the key is
`--api-key` or the first of $SERVE_APP_API_KEYS. Server errors print as one line.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from collections.abc import Iterator

import httpx


class CLIError(Exception):
    """One line for the user, exit status 1."""


class Client:
    def __init__(self, url: str, api_key: str | None, timeout: float = 600):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.url = url.rstrip("/")
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def get(self, path: str) -> dict:
        return self._json(self._send("GET", path))

    def model(self, task: str = "generate") -> str:
        """The first served model of this task."""
        cards = self.get("/v1/models")["data"]
        for card in cards:
            if card.get("task", "generate") == task:
                return card["id"]
        raise CLIError(f"{self.url} serves no {'embedding' if task == 'embed' else 'generation'} model "
                       f"(it serves: {', '.join(c['id'] for c in cards)})")

    def post(self, path: str, body: dict) -> dict:
        try:
            return self._json(self.http.post(path, json=body))
        except httpx.TransportError as e:
            raise self._unreachable(e) from None

    def stream(self, path: str, body: dict) -> Iterator[dict]:
        """The server-sent events of a streaming request, as dicts; an error event raises."""
        try:
            with self.http.stream("POST", path, json={**body, "stream": True}) as r:
                if r.status_code != 200:
                    r.read()
                    self._json(r)
                for line in r.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    event = json.loads(line[6:])
                    if "error" in event:
                        raise CLIError(f"server error: {event['error'].get('message')}")
                    yield event
        except httpx.TransportError as e:
            raise self._unreachable(e) from None

    def _send(self, method: str, path: str) -> httpx.Response:
        try:
            return self.http.request(method, path)
        except httpx.TransportError as e:
            raise self._unreachable(e) from None

    def _unreachable(self, e: Exception) -> CLIError:
        return CLIError(f"cannot reach {self.url} ({type(e).__name__}); is `serve run serve_config.yaml` running?")

    @staticmethod
    def _json(r: httpx.Response) -> dict:
        try:
            body = r.json()
        except ValueError:
            body = {}
        if r.status_code >= 400:
            error = body.get("error", {}) if isinstance(body, dict) else {}
            raise CLIError(f"HTTP {r.status_code}: {error.get('message') or r.text.strip()[:200]}")
        return body


def cmd_complete(client: Client, args) -> None:
    body = {"model": args.model or client.model(), "prompt": args.prompt, "max_tokens": args.max_tokens,
            "temperature": args.temperature}
    for event in client.stream("/v1/completions", body):
        for choice in event.get("choices", []):
            print(choice.get("text", ""), end="", flush=True)
    print()


def cmd_chat(client: Client, args) -> None:
    model = args.model or client.model()
    messages = [{"role": "system", "content": args.system}] if args.system else []
    print(f"chatting with {model} at {client.url} (empty line or Ctrl-D to quit)")
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            break
        if not line:
            break
        messages.append({"role": "user", "content": line})
        reply = []
        body = {"model": model, "messages": messages, "max_tokens": args.max_tokens, "temperature": args.temperature}
        for event in client.stream("/v1/chat/completions", body):
            for choice in event.get("choices", []):
                text = choice.get("delta", {}).get("content") or ""
                reply.append(text)
                print(text, end="", flush=True)
        print()
        messages.append({"role": "assistant", "content": "".join(reply)})


def cmd_embed(client: Client, args) -> None:
    model = args.model or client.model("embed")
    texts = list(args.texts)
    body = {"model": model, "input": texts + ([args.query] if args.query is not None else [])}
    if args.dimensions:
        body["dimensions"] = args.dimensions
    vectors = [d["embedding"] for d in sorted(client.post("/v1/embeddings", body)["data"], key=lambda d: d["index"])]
    if args.query is None:
        for vector in vectors:
            print(json.dumps(vector))
        return
    query = vectors.pop()
    ranked = sorted(zip((cosine(query, v) for v in vectors), texts), key=lambda pair: -pair[0])
    for score, text in ranked:
        print(f"{score:.4f}  {text}")


def cosine(a: list[float], b: list[float]) -> float:
    norm = math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))
    return sum(x * y for x, y in zip(a, b)) / norm if norm else 0.0


def cmd_status(client: Client, args) -> None:
    health = client._send("GET", "/health")
    stats = client.get("/stats?replicas=1")
    ready = "ready" if health.status_code == 200 else "NOT READY"
    print(f"{client.url}: {ready}")
    for name, model in stats["models"].items():
        router = model["router"]
        extra = f", {model['dimensions']} dimensions" if "dimensions" in model else ""
        print(f"\nmodel {name} ({model['task']}, context {model['max_model_len']}{extra})")
        print(f"routers {router.get('routers', 0)}: {router.get('queued_requests', 0)} requests queued, "
              f"{router.get('in_flight_sequences', 0)} sequences in flight, {router.get('rejected', 0)} rejected")
        unreachable = {k: v for k, v in model.get("unreachable", {}).items() if v}
        if unreachable:
            print(f"unreachable: {unreachable}")
        if model["task"] == "embed":
            rows = [("replica", "device", "GPUs", "inputs", "embedded", "per forward", "forward ms", "forwards")]
            for r in router.get("replica_info", []):
                rows.append((r["replica_id"], r["device"], ",".join(r["gpu_ids"]) or "-", str(r["in_flight_inputs"]),
                             str(r["inputs_embedded"]), f"{r['inputs_per_forward_mean']:.1f}",
                             f"{r['forward_ms_mean']:.0f}", str(r["forwards"])))
        else:
            rows = [("replica", "device", "GPUs", "dtype", "running", "waiting", "KV used", "prefix cache hits",
                     "step ms", "steps")]
            for r in router.get("replica_info", []):
                kv = 1 - r["kv_cache_free_blocks"] / max(1, r["kv_cache_blocks"])
                hits = f"{r['prefix_cache_hits'] / r['prefix_cache_queries']:.0%}" if r["prefix_cache_queries"] else "-"
                rows.append((r["replica_id"], r["device"], ",".join(r["gpu_ids"]) or "-", r["dtype"],
                             str(r["running_sequences"]), str(r["engine_sequences"] - r["running_sequences"]),
                             f"{kv:.0%}", hits, f"{r['engine_step_ms_mean']:.0f}", str(r["engine_steps"])))
            for reason in sorted({f"dtype {r['dtype']}: {r['dtype_reason']}" for r in router.get("replica_info", [])}):
                print(reason)
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        for row in rows:
            print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)))


def cmd_bench(args, rest: list[str]) -> int:
    return subprocess.call([sys.executable, "-m", "bench.run", *rest])


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="serve-app", description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default=os.environ.get("SERVE_APP_URL", "http://127.0.0.1:8000"))
    p.add_argument("--api-key", default=(os.environ.get("SERVE_APP_API_KEYS", "").split(",")[0] or None))
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("chat", "complete"):
        c = sub.add_parser(name)
        c.add_argument("--model", help="default: the served model")
        c.add_argument("--max-tokens", type=int, default=256)
        c.add_argument("--temperature", type=float, default=0.7)
        if name == "complete":
            c.add_argument("prompt")
        else:
            c.add_argument("--system", help="a system message")
    e = sub.add_parser("embed", help="embed texts: one JSON vector per line, or with --query a ranking")
    e.add_argument("texts", nargs="+")
    e.add_argument("--model", help="default: the first embedding model served")
    e.add_argument("--query", help="print the texts ranked by cosine similarity to this query instead")
    e.add_argument("--dimensions", type=int, help="shorter vectors (Matryoshka models only)")
    sub.add_parser("status", help="each model's replicas, devices and load")
    sub.add_parser("bench", help="run the benchmark (arguments go to bench/run.py)", add_help=False)
    return p


def main(argv: list[str] | None = None) -> int:
    args, rest = parser().parse_known_args(argv)
    if args.command == "bench":
        return cmd_bench(args, rest)
    if rest:
        parser().error(f"unrecognized arguments: {' '.join(rest)}")
    client = Client(args.url, args.api_key)
    try:
        {"chat": cmd_chat, "complete": cmd_complete, "embed": cmd_embed, "status": cmd_status}[args.command](
            client, args)
    except CLIError as e:
        print(f"serve-app: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
