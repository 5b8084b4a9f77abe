"""Who may call the API, from where: API keys, Host allow-list, Ray's control headers.

Plain functions; the ingress applies them to every request before reading its body.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import socket
from collections.abc import Mapping
from pathlib import Path

from serve_app.config import AppArgs
from serve_app.protocol import APIError

API_KEYS_ENV = "SERVE_APP_API_KEYS"

# Headers Ray Serve's proxy acts on before our code runs: a client sending
# `x-request-disconnect-disabled: ?1` would keep generating after it left, and
# `x-request-timeout-seconds: 0` lifts the proxy's timeout.
RAY_CONTROL_HEADERS = ("x-request-disconnect-disabled", "x-request-timeout-seconds")


def load_api_keys(args: AppArgs, environ: Mapping[str, str] = os.environ) -> list[str]:
    """Every accepted key: from the config, the SERVE_APP_API_KEYS variable (comma-separated)
    and `api_key_file` (one per line). Empty means no authentication."""
    keys = [args.api_key] if isinstance(args.api_key, str) else list(args.api_key or [])
    keys += environ.get(API_KEYS_ENV, "").split(",")
    if args.api_key_file:
        try:
            keys += Path(args.api_key_file).read_text().splitlines()
        except OSError as e:
            raise ValueError(f"api_key_file {args.api_key_file!r} cannot be read: {e}") from None
    return [k.strip() for k in keys if k and k.strip()]


def check_api_key(authorization: str | None, keys: list[str]) -> None:
    """401 unless `Authorization: Bearer <one of keys>` (constant-time comparison)."""
    if not keys:
        return
    scheme, _, given = (authorization or "").partition(" ")
    given_bytes = given.strip().encode()
    # Compare against every key, without stopping early: the time taken says nothing.
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(given_bytes, key.encode())
    if scheme.lower() != "bearer" or not matched:
        raise APIError(401, "invalid or missing API key (send 'Authorization: Bearer <key>')",
                       type="authentication_error", code="invalid_api_key")


LOCAL_HOSTS = ("localhost", "*.localhost")


def default_allowed_hosts() -> list[str]:
    """Who a keyless server answers by default: its loopback and own names, and any IP address.
    A web page can reach a local server through DNS rebinding, but only under a name of its own
    domain, never an IP literal or this machine's name."""
    names = {socket.gethostname(), socket.getfqdn()}
    return [*LOCAL_HOSTS, *sorted(n.lower() for n in names if n), "<ip>"]


def allowed_hosts(args: AppArgs, api_keys: list[str]) -> list[str] | None:
    """The Host allow-list in force: `allowed_hosts` as configured ("*": any host); unset, any host
    when API keys are required (a page cannot send them), else `default_allowed_hosts()`."""
    if args.allowed_hosts is not None:
        return None if "*" in args.allowed_hosts else args.allowed_hosts
    return None if api_keys else default_allowed_hosts()


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
        return True
    except ValueError:
        return False


def host_allowed(host_header: str | None, allowed: list[str] | None) -> bool:
    """Whether the Host header names this server (no allow-list: any host). In the list, a
    leading "*." matches subdomains and "<ip>" any IP address."""
    if allowed is None:
        return True
    host = (host_header or "").strip().lower()
    if host.startswith("["):  # [ipv6]:port
        host = host[: host.find("]") + 1]
    else:
        host = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    if "<ip>" in allowed and _is_ip(host):
        return True
    for pattern in allowed:
        pattern = pattern.lower()
        if pattern == "*" or host == pattern or (pattern.startswith("*.") and host.endswith(pattern[1:])):
            return True
    return False


def check_edge(headers: Mapping[str, str], args: AppArgs, hosts: list[str] | None) -> None:
    """What every request must pass before anything else is done with it (`hosts`: allowed_hosts())."""
    if not host_allowed(headers.get("host"), hosts):
        raise APIError(400, "this server does not serve the host named in the Host header",
                       param="Host", code="invalid_host")
    if not args.trust_ray_headers:
        for name in RAY_CONTROL_HEADERS:
            if name in headers:
                raise APIError(400, f"the '{name}' header is not accepted by this server "
                                    "(an operator can allow it with trust_ray_headers)", param=name,
                               code="forbidden_header")
