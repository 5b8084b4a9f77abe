"""Block hashes of a token sequence: what identifies a cached KV block (no torch, no Ray).

A full block of `block_size` tokens is named by a hash chain: the hash of its parent block's
hash and its own token ids, starting from a root that is the salt (the model, plus whatever
else must keep two caches apart: a request's `cache_salt`, the tenant's key). Two sequences
share a block's keys and values exactly when they share every token up to the end of that
block and the salt. The engine's block manager keys its prefix cache by these hashes; the
ingress computes the same chain for a prompt so the router can place it where its prefix is.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence

DIGEST_BYTES = 16  # 128 bits: a collision would silently serve another prefix's keys


def sequence_salt(model_salt: str, request_salt: str | None) -> str:
    """The salt of one sequence's chain: its model's, and its request's `cache_salt` if any."""
    return f"{model_salt}|{request_salt or ''}"


def root_hash(salt: str) -> bytes:
    """The parent of a sequence's first block."""
    return hashlib.blake2b(salt.encode(), digest_size=DIGEST_BYTES, person=b"serve_app.root").digest()


def chain_hash(parent: bytes, tokens: Sequence[int]) -> bytes:
    """The hash of a block holding `tokens`, whose predecessor block hashed to `parent`."""
    h = hashlib.blake2b(parent, digest_size=DIGEST_BYTES)
    h.update(array("q", tokens).tobytes())
    return h.digest()


def block_hashes(token_ids: Sequence[int], block_size: int, salt: str, limit: int | None = None) -> list[bytes]:
    """Hashes of the full blocks of `token_ids` (at most `limit` of them), in order."""
    full = len(token_ids) // block_size
    if limit is not None:
        full = min(full, limit)
    out: list[bytes] = []
    parent = root_hash(salt)
    for i in range(full):
        parent = chain_hash(parent, token_ids[i * block_size:(i + 1) * block_size])
        out.append(parent)
    return out


def extend_hashes(hashes: list[bytes], token_ids: Sequence[int], block_size: int, salt: str,
                  upto_tokens: int) -> None:
    """Append the hashes of the full blocks within the first `upto_tokens` tokens not yet in `hashes`."""
    full = min(upto_tokens, len(token_ids)) // block_size
    parent = hashes[-1] if hashes else root_hash(salt)
    for i in range(len(hashes), full):
        parent = chain_hash(parent, token_ids[i * block_size:(i + 1) * block_size])
        hashes.append(parent)
