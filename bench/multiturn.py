"""Multi-turn customer-service chat: what reuse of a shared prefix across requests buys.

`users` people chat at once, `turns` turns each. Every request carries the same long policy
system prompt (bench/support_policy.md) and the whole conversation so far, the assistant's
actual earlier replies included, so each turn's prompt extends the previous turn's prompt
and reply. A server that keeps KV across requests prefills only the new part.

Reported: TTFT p50 of first turns (nothing to reuse yet, all users at once) and of later
turns, output tokens/s over the whole run, and the fraction of prompt tokens the server
says it served from its cache (`usage.prompt_tokens_details.cached_tokens`, OpenAI's
field; llama.cpp's `timings.cache_n` where that is missing; 0 when a server reports neither).

    python -m bench.multiturn --url http://127.0.0.1:8000 --model builtin:smollm2-135m-instruct
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import aiohttp

from bench.loadgen import RequestResult, one_request, percentiles, tokens_between

POLICY = (Path(__file__).parent / "support_policy.md").read_text()

# One customer per row, one message per turn: each conversation stays on its topic, as chats do.
CUSTOMERS = (
    ("Hi, I ordered a sofa two weeks ago and it still has not arrived. What is going on?",
     "The order number is NW-10482317 and my email is dana.k@example.com.",
     "The carrier never called me. Can I get white-glove delivery instead?",
     "If it does not come by Friday, can I cancel and get my money back?"),
    ("My new toaster started sparking this morning. What should I do?",
     "I bought it in March, order NW-20993145. Is it still under warranty?",
     "I would rather have a replacement than a repair kit. Is that possible?",
     "Do I need to ship the broken one back, and who pays for that?"),
    ("Can I return a duvet cover I opened but never used?",
     "It was not on clearance. I paid $89 for it last week.",
     "I am a Northwind Rewards member. Does that change the return shipping cost?",
     "How long until the refund shows up on my credit card?"),
    ("The package says delivered but there is nothing at my door.",
     "I checked with my neighbours and the front desk, nothing there either.",
     "It has been three days now. What happens next?",
     "I would prefer a refund over a replacement. How do I get that?"),
    ("I placed an order an hour ago and want to change the lamp colour from black to brass.",
     "Order NW-31200877, email sam.r@example.com.",
     "Also, can I add a promo code I forgot to enter at checkout?",
     "Okay. And can I switch the shipping to express?"),
    ("The bookshelf I received is missing two shelf pins and a panel.",
     "The assembly guide says the panel is part D and the pins are part K.",
     "How quickly can you send them? I have guests coming on Saturday.",
     "The side panel also has a crack. Should I send a photo of that too?"),
    ("I bought a dining table for $640 and now it is on sale for $560.",
     "I bought it ten days ago. It was not a flash sale.",
     "Can the difference go to store credit instead of my card?",
     "Thanks. How many reward points will I get for the original purchase?"),
    ("I want to speak to a real person. My chair broke after one month.",
     "I was sitting on it normally and one leg snapped. I hurt my wrist a little.",
     "I already threw the chair away. Can I still make a claim?",
     "What are your hours for human agents? I work until 9 p.m."),
)


@dataclass
class MultiTurnChat:
    """The conversation shape: how many users chat at once, their turns and reply length.

    Replies stop at `max_tokens` or where the model ends them (no `ignore_eos` unless asked):
    the history each turn carries is the reply the server actually gave."""

    users: int = 8
    turns: int = 4
    max_tokens: int = 48
    ignore_eos: bool = False
    system_prompt: str = POLICY

    def __post_init__(self) -> None:
        if not 1 <= self.users <= len(CUSTOMERS) or not 1 <= self.turns <= len(CUSTOMERS[0]):
            raise ValueError(f"at most {len(CUSTOMERS)} users and {len(CUSTOMERS[0])} turns")

    def describe(self) -> str:
        return (f"{self.users} users × {self.turns} turns, ~{len(self.system_prompt.split())}-word system prompt, "
                f"history carried, ≤{self.max_tokens}-token replies")


def _cached_fraction(cached: int, prompt: int) -> float | None:
    return cached / prompt if prompt else None


async def run_multiturn(url: str, model: str, chat: MultiTurnChat, fresh_connections: bool = False,
                        timeout_s: float = 1800) -> dict:
    """All users at once, each sending its next turn when the previous reply has ended.

    The report has run_load's fields (so the same tables show it) and the multi-turn figures:
    `first_turn_ttft_s`, `later_turn_ttft_s`, `prompt_tokens`, `cached_prompt_tokens`,
    `cached_fraction`, and each request's user, turn, token counts and reply in `turns`."""
    extra = {"ignore_eos": True} if chat.ignore_eos else {}
    results: list[tuple[int, int, RequestResult]] = []
    # force_close: one connection per request, for servers that drop kept-alive ones (llama-server).
    connector = aiohttp.TCPConnector(limit=0, force_close=fresh_connections)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout_s)) as session:
        async def user(u: int) -> None:
            messages = [{"role": "system", "content": chat.system_prompt}]
            for turn, question in enumerate(CUSTOMERS[u][:chat.turns]):
                messages.append({"role": "user", "content": question})
                r = await one_request(session, url, model, "", chat.max_tokens, True, extra, messages=list(messages))
                results.append((u, turn, r))
                if not r.ok:
                    return  # the conversation cannot go on without the reply
                messages.append({"role": "assistant", "content": r.text})

        start = time.perf_counter()
        await asyncio.gather(*(user(u) for u in range(chat.users)))
        end = time.perf_counter()
    duration = end - start
    ok = [r for _, _, r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    prompt_tokens = sum(r.prompt_tokens for r in ok)
    cached = sum(r.cached_tokens for r in ok)
    itls = [x for r in ok for x in r.itl_s]
    num_requests = chat.users * chat.turns
    return {
        "mode": f"{chat.users} users", "concurrency": chat.users, "request_rate": None,
        "num_requests": num_requests, "completed": len(ok),
        "failed_by_status": dict(Counter(r.status for _, _, r in results if not r.ok)
                                 + Counter({"not sent": num_requests - len(results)})),
        "duration_s": duration,
        "request_throughput": len(ok) / duration,
        "output_tokens": out_tokens,
        "output_tokens_per_s": out_tokens / duration,
        "steady_window_s": duration,
        "steady_output_tokens_per_s": tokens_between(ok, start, end) / duration,
        "ttft_s": percentiles([r.ttft_s for r in ok]),
        "first_turn_ttft_s": percentiles([r.ttft_s for _, turn, r in results if r.ok and turn == 0]),
        "later_turn_ttft_s": percentiles([r.ttft_s for _, turn, r in results if r.ok and turn > 0]),
        "tpot_s": percentiles([r.tpot_s for r in ok if r.tpot_s is not None]),
        "itl_s": percentiles(itls),
        "itl_max_s": max(itls, default=None),
        "e2e_s": percentiles([r.e2e_s for r in ok]),
        "prompt_tokens": prompt_tokens,
        "cached_prompt_tokens": cached,
        "cached_fraction": _cached_fraction(cached, prompt_tokens),
        "turns": [{"user": u, "turn": turn, "ok": r.ok, "prompt_tokens": r.prompt_tokens,
                   "cached_tokens": r.cached_tokens, "output_tokens": r.output_tokens, "ttft_s": r.ttft_s,
                   "reply": r.text}
                  for u, turn, r in sorted(results, key=lambda x: x[:2])],
        "workload": {k: v for k, v in asdict(chat).items() if k != "system_prompt"},
        "workload_label": chat.describe(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--users", type=int, default=8)
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--fresh-connections", action="store_true", help="one connection per request")
    a = p.parse_args()
    report = asyncio.run(run_multiturn(a.url, a.model, MultiTurnChat(a.users, a.turns, a.max_tokens),
                                       a.fresh_connections))
    print(json.dumps({k: v for k, v in report.items() if k != "turns"}, indent=2))


if __name__ == "__main__":
    main()
