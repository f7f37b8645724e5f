"""The endpoint's optional bearer token: where it comes from, and the check of a request's ``Authorization`` header.

The token is ``$DETAILFUSION_API_TOKEN`` or the content of ``ServeConfig.api_token_file`` (one, not both), read once
by the driver that builds the app. Only its SHA-256 digest travels to the replicas (it is not kept in the Serve
controller's state in the clear), and a request's token is compared by digest with ``hmac.compare_digest`` (constant
time). No token: every route is open.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path

from detailfusion.library.errors import ConfigError

TOKEN_VARIABLE = "DETAILFUSION_API_TOKEN"
OPEN_PATHS = ("/healthz",)  # answered without a token (a load balancer's health probe)


def load_token(token_file: str | None) -> str | None:
    """The configured token, or None (no token: the endpoint is open). An empty file or both sources is an error."""
    from_env = os.environ.get(TOKEN_VARIABLE) or None
    if token_file is None:
        return from_env
    if from_env is not None:
        raise ConfigError(f"the API token is set twice: ${TOKEN_VARIABLE} and api_token_file {token_file!r}; "
                          "give one")
    path = Path(token_file)
    try:
        token = path.read_text().strip()
    except OSError as exc:
        raise ConfigError(f"api_token_file {token_file!r}: cannot read it ({exc.strerror})") from None
    if not token:
        raise ConfigError(f"api_token_file {token_file!r} is empty (leave api_token_file out for an open endpoint)")
    return token


def token_digest(token: str | None) -> bytes | None:
    return None if token is None else hashlib.sha256(token.encode()).digest()


def authorized(header: str | None, digest: bytes | None) -> bool:
    """Whether an ``Authorization`` header value (``Bearer <token>``) carries the token of ``digest`` (None: open)."""
    if digest is None:
        return True
    scheme, _, given = (header or "").partition(" ")
    given_digest = hashlib.sha256(given.strip().encode()).digest()
    # compared whatever the scheme, so the time taken does not tell a wrong scheme from a wrong token
    return hmac.compare_digest(given_digest, digest) and scheme.lower() == "bearer"
