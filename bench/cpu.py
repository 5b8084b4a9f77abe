"""CPU time of the serving processes during a benchmark run, by role.

Ray names its worker processes after what they run (`ray::ServeReplica:<app>:Router`,
`ray::ProxyActor`, ...); this samples their user + system CPU time before and after
a run and reports cores used and CPU milliseconds per output token for each role
(llama.cpp's `llama-server` too, when the benchmark runs it).
"""

from __future__ import annotations

import psutil

ROLES = (("ProxyActor", "proxy"), (":Ingress", "ingress"), (":Router", "router"),
         (":ModelReplica", "replica"), (":EmbeddingReplica", "replica"), ("raylet", "ray system"),
         ("gcs_server", "ray system"), ("ServeController", "ray system"), ("llama-server", "llama-server"))


def role_of(proc: psutil.Process) -> str | None:
    try:
        text = " ".join(proc.cmdline()[:2]) or proc.name()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None
    return next((role for needle, role in ROLES if needle in text), None)


def snapshot() -> dict[int, tuple[str, float]]:
    """pid -> (role, CPU seconds so far), for every serving process this process started (Ray's,
    started by ray.init here, and llama-server): not those of other Ray clusters on the machine."""
    out = {}
    for proc in psutil.Process().children(recursive=True):
        role = role_of(proc)
        if role is None:
            continue
        try:
            times = proc.cpu_times()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        out[proc.pid] = (role, times.user + times.system)
    return out


class CpuMeter:
    """`start()`, run the load, then `stop(duration_s, output_tokens)`."""

    def start(self) -> None:
        self._before = snapshot()
        self._client_before = _self_cpu()

    def stop(self, duration_s: float, output_tokens: int) -> dict[str, dict[str, float]]:
        by_role: dict[str, float] = {}
        for pid, (role, cpu) in snapshot().items():
            by_role[role] = by_role.get(role, 0.0) + cpu - self._before.get(pid, (role, 0.0))[1]
        by_role["load generator"] = _self_cpu() - self._client_before
        by_role["proxy + ingress + router"] = sum(by_role.get(r, 0.0) for r in ("proxy", "ingress", "router"))
        return {role: {"cores": cpu / duration_s,
                       "cpu_ms_per_token": cpu * 1000 / output_tokens if output_tokens else None}
                for role, cpu in sorted(by_role.items())}


def _self_cpu() -> float:
    times = psutil.Process().cpu_times()
    return times.user + times.system
