"""Who is asking: bearer tokens checked with Globus Auth, or no authentication at all.

With a client id and secret, every request's token is introspected with globus-sdk (the answer is
cached for a minute, never past the token's expiry): it must be active and carry this server's
scope, and its identity becomes the owner of the streams it creates. globus-sdk reads its own
environment (GLOBUS_SDK_ENVIRONMENT, GLOBUS_SDK_SERVICE_URL_AUTH, GLOBUS_SDK_VERIFY_SSL), which is
how the tests point it at a local stand-in for Globus Auth.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Protocol

from ..errors import Internal, Unauthenticated

log = logging.getLogger(__name__)

CACHE_SECONDS = 60.0


@dataclass(frozen=True)
class Identity:
    id: str  # stable subject id; sessions are owned by it
    name: str  # for logs and listings


class Authenticator(Protocol):
    @property
    def enabled(self) -> bool: ...

    @property
    def scope(self) -> str | None: ...

    def identify(self, token: str | None) -> Identity | None:
        """The identity behind `token`, None when authentication is off; raises Unauthenticated."""
        ...


class NoAuth:
    enabled = False
    scope = None

    def identify(self, token: str | None) -> Identity | None:
        return None


def default_scope(client_id: str) -> str:
    """The scope this server advertises: built as `s2uc` expands a scope ID, so the two agree."""
    from ..s2uc.scopes import scistream_scope  # loads globus-sdk: only with authentication on

    return scistream_scope(client_id)


class GlobusAuth:
    enabled = True

    def __init__(self, client_id: str, client_secret: str, scope: str | None = None) -> None:
        import globus_sdk  # only servers with authentication on need it loaded

        from ..s2uc.scopes import login_form

        self.scope = scope or default_scope(client_id)
        # The login hint names the scope ID, as facilities hand it out and the user guide writes it.
        self._login = f"s2uc login --scope {login_form(self.scope)}"
        self._client = globus_sdk.ConfidentialAppAuthClient(client_id, client_secret)
        self._api_error = globus_sdk.GlobusAPIError
        self._network_error = globus_sdk.NetworkError
        self._cache: dict[str, tuple[float, Identity]] = {}  # sha256(token) -> (valid until, who)
        self._lock = threading.Lock()

    def identify(self, token: str | None) -> Identity | None:
        login = self._login
        if not token:
            raise Unauthenticated(f"this server requires a Globus login: {login}")
        key = hashlib.sha256(token.encode()).hexdigest()  # no token kept in memory longer than needed
        now = time.time()
        with self._lock:
            cached = self._cache.get(key)
            if cached and cached[0] > now:
                return cached[1]
        info = self._introspect(token)
        if not info.get("active"):
            raise Unauthenticated(f"your token is expired or revoked: {login}")
        scopes = str(info.get("scope", "")).split()
        if self.scope not in scopes:
            raise Unauthenticated(f"your token is not for this server's scope: {login}")
        who = Identity(id=str(info.get("sub")), name=str(info.get("username") or info.get("sub")))
        until = min(now + CACHE_SECONDS, float(info.get("exp") or now + CACHE_SECONDS))
        with self._lock:
            self._cache = {k: v for k, v in self._cache.items() if v[0] > now}
            self._cache[key] = (until, who)
        return who

    def _introspect(self, token: str) -> dict[str, Any]:
        try:
            return dict(self._client.oauth2_token_introspect(token).data)
        except self._api_error as exc:
            log.error("Globus Auth refused to introspect a token: %s", exc)
            raise Internal("Globus Auth refused this server's credentials; tell its operator") from None
        except self._network_error as exc:
            log.error("cannot reach Globus Auth: %s", exc)
            raise Internal("this server cannot reach Globus Auth right now; try again later") from None
