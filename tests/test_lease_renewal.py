"""The ingress side of leases: RoutedBackend renews what it holds, per Router replica, and
stops when it holds nothing (driven with stand-in handles: no Ray)."""

import asyncio

from deployments.router import RoutedBackend


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
    by_router = {kwargs["replica_id"]: sorted(args[0]) for args, kwargs in calls[-2:]}
    assert by_router == {"router-1": ["a", "c"], "router-2": ["b"]}
    backend._held.clear()  # every request ended: the loop stops
    await asyncio.sleep(0.15)
    assert backend._renewing.done()
    sent = len(calls)
    await asyncio.sleep(0.15)
    assert len(router.renew.calls) == sent
