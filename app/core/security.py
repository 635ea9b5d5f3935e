"""API keys: `mp_<prefix>_<secret>`, stored as SHA-256 (keys are 192-bit random, so no slow hash needed)."""

from __future__ import annotations

import hashlib
import secrets


def generate_api_key() -> tuple[str, str, str]:
    """Returns (plaintext key, its prefix, its hash). The plaintext is shown once and never stored."""
    prefix = secrets.token_hex(4)
    key = f"mp_{prefix}_{secrets.token_urlsafe(24)}"
    return key, prefix, hash_api_key(key)


def hash_api_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()
