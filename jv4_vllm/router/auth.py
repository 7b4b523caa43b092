"""Optional Bearer API keys, read once at start-up from an env var and/or a file.

Keys are compared in constant time and never logged or echoed.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from jv4_vllm.config import RouterConfig
from jv4_vllm.errors import AuthenticationError

__all__ = ["ApiKeys"]


class ApiKeys:
    """The accepted keys; an empty set means authentication is off."""

    def __init__(self, keys: Iterable[str]) -> None:
        self._keys = [key.encode("utf-8") for key in {k.strip() for k in keys} if key]

    @classmethod
    def from_config(cls, router: RouterConfig, environ: Mapping[str, str] | None = None) -> ApiKeys:
        """Comma-separated keys from ``router.api_keys_env``, plus one key per line of ``api_keys_file``."""
        env = os.environ if environ is None else environ
        keys = env.get(router.api_keys_env, "").split(",") if router.api_keys_env else []
        if router.api_keys_file:
            path = Path(router.api_keys_file)
            if not path.is_file():
                raise FileNotFoundError(f"API key file {path} does not exist")
            lines = path.read_text(encoding="utf-8").splitlines()
            keys += [line for line in lines if line.strip() and not line.lstrip().startswith("#")]
        return cls(keys)

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def check(self, authorization: str | None) -> None:
        """Raise AuthenticationError unless the ``Authorization`` header holds an accepted key."""
        if not self._keys:
            return
        scheme, _, token = (authorization or "").strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthenticationError("missing API key: send the header 'Authorization: Bearer <key>'")
        candidate = token.strip().encode("utf-8")
        matched = False
        for key in self._keys:  # no early exit: the time taken does not depend on which key matched
            matched |= hmac.compare_digest(candidate, key)
        if not matched:
            raise AuthenticationError("invalid API key")
