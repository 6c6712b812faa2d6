"""API keys: ``Authorization: Bearer KEY`` checked in constant time against every configured key."""

from __future__ import annotations

import hmac
import logging
from typing import Annotated

from fastapi import Depends, HTTPException
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from app.settings import Settings
from app.state import StateDep

log = logging.getLogger(__name__)

# auto_error=False: a missing header is answered 401 here (HTTPBearer's own answer is 403)
bearer = HTTPBearer(auto_error=False, description="one of the keys in API_KEY")
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]


def key_matches(presented: str, keys: list[bytes]) -> bool:
    """Compares with every key, without stopping at the first match, so timing tells nothing."""
    given = presented.encode()
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(given, key)
    return matched


async def require_key(state: StateDep, credentials: Credentials) -> None:
    """Writes, user data and admin: refused without a valid key whenever keys are configured."""
    keys = state.settings.api_keys
    if keys and (credentials is None or not key_matches(credentials.credentials, keys)):
        state.metrics.auth_failures.inc()
        raise HTTPException(401, "missing or invalid API key", headers={"WWW-Authenticate": "Bearer"})


def warn_if_open(settings: Settings) -> None:
    if not settings.api_keys:
        log.warning(
            "API_KEY is not set: POST /events, GET /users/*/history and /admin/* accept requests from ANYONE "
            "who can reach this port. Set API_KEY (comma-separated for several keys) in production."
        )
    elif settings.score_requires_key:
        log.info("API keys: %d configured; required on every endpoint but health and metrics", len(settings.api_keys))
    else:
        log.info("API keys: %d configured; /score is open (SCORE_REQUIRES_KEY=false)", len(settings.api_keys))
