"""The ingress side of leases: RoutedBackend renews what it holds, per Router replica, and
stops when it holds nothing (driven with stand-in handles: no Ray)."""

import asyncio

from deployments.routed_backend import RoutedBackend


class Method:
    def __init__(self):
        self.calls = []

    def remote(self, *args, **kwargs):
        self.calls.append((args, kwargs))


class Handle:
    def __init__(self):
        self.renew = Method()

    def options(self, **kwargs):
        return self


async def test_held_leases_are_renewed_with_the_router_that_granted_them_until_released():
    router = Handle()
    backend = RoutedBackend(router, Handle(), lease_timeout_s=0.4)  # renews every 0.1 s
    backend._held.update({"a": "router-1", "b": "router-2", "c": "router-1"})
    backend._start_renewing()
    await asyncio.sleep(0.25)
    calls = router.renew.calls
    assert len(calls) >= 2 * 2  # two rounds at least, one call per router each
    by_router = {kwargs["pinned_to"]: sorted(args[0]) for args, kwargs in calls[-2:]}
    assert by_router == {"router-1": ["a", "c"], "router-2": ["b"]}
    backend._held.clear()  # every request ended: the loop stops
    await asyncio.sleep(0.15)
    assert backend._renewing.done()
    sent = len(calls)
    await asyncio.sleep(0.15)
    assert len(router.renew.calls) == sent


def test_a_request_that_outlives_the_lease_timeout_keeps_its_lease(ray_cluster):
    """End to end through real handles: a stream several times longer than `lease_timeout_s`
    is renewed all along (a lease that expired would show in `expired_leases`)."""
    import time

    import httpx
    from ray import serve

    from serve_app.app import build_app
    from tests.conftest import APP_ARGS, TINY, model_stats

    serve.run(build_app({**APP_ARGS, "lease_timeout_s": 0.5}), name="leases", route_prefix="/leases")
    base = f"{ray_cluster}/leases"
    try:
        # 8 choices: several lease periods long on fast hosts too (one choice took 1.0 s on an EPYC)
        body = {"model": TINY, "prompt": "renew", "max_tokens": 1900, "ignore_eos": True, "stream": True, "n": 8}
        started = time.monotonic()
        with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=120) as r:
            assert r.status_code == 200
            lines = [line for line in r.iter_lines() if line.startswith("data: ")]
        took = time.monotonic() - started
        assert lines[-1] == "data: [DONE]"
        assert took > 3 * 0.5, f"the stream took {took:.1f} s: too short to need renewing"
        router = model_stats(base)["router"]
        assert router["expired_leases"] == 0 and router["in_flight_sequences"] == 0, router
    finally:
        serve.delete("leases")
