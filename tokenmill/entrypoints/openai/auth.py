"""API keys: `Authorization: Bearer <key>`, compared by sha256 digest in constant time."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence
from http import HTTPStatus

from tokenmill.entrypoints.openai.errors import OpenAIError
from tokenmill.entrypoints.openai.server_config import ApiKey

# The identity of requests when the server has no API keys.
ANONYMOUS = ApiKey(name="anonymous", key_sha256=b"")


class Authenticator:
    def __init__(self, keys: Sequence[ApiKey]) -> None:
        self.keys = tuple(keys)

    @property
    def enabled(self) -> bool:
        return bool(self.keys)

    def authenticate(self, authorization: str | None) -> ApiKey:
        """The key the Authorization header carries; OpenAIError (401) when it is missing or unknown."""
        if not self.enabled:
            return ANONYMOUS
        scheme, _, token = (authorization or "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise _unauthorized("Missing API key: send it in the header 'Authorization: Bearer <key>'.")
        digest = hashlib.sha256(token.encode("utf-8")).digest()
        found = None
        # Compare with every key, without stopping at a match: the time taken does not reveal which key matched.
        for key in self.keys:
            if hmac.compare_digest(digest, key.key_sha256):
                found = key
        if found is None:
            raise _unauthorized("Invalid API key: check the key sent in 'Authorization: Bearer <key>'.")
        return found


def _unauthorized(message: str) -> OpenAIError:
    return OpenAIError(message, HTTPStatus.UNAUTHORIZED, code="invalid_api_key",
                       headers={"WWW-Authenticate": "Bearer"})
