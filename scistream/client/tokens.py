"""Globus tokens of the user client: log in, keep, refresh, check, revoke.

Tokens live in ~/.scistream/tokens.json (SCISTREAM_HOME moves the directory), in globus-sdk's own
token storage, readable by the user only. The native-app client id comes from SCISTREAM_CLIENT_ID:
the one built in is a placeholder, which `s2uc login` refuses. globus-sdk reads its environment
(GLOBUS_SDK_ENVIRONMENT, GLOBUS_SDK_SERVICE_URL_AUTH, GLOBUS_SDK_VERIFY_SSL), so tests run this
code against a local stand-in for Globus Auth.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError, Unauthenticated, Unreachable
from ..globus import retry_config, unreachable

TYPE_CHECKING = False  # typing's, without importing typing: nothing here needs it to run
if TYPE_CHECKING:
    from typing import Any

# The native-app client id `s2uc login` presents to Globus Auth. A placeholder: no client has been
# registered at Globus for the project yet, so facilities register one and set
# SCISTREAM_CLIENT_ID (docs/operator-guide.md, Authentication). `s2uc login` refuses it, since
# Globus Auth would refuse it only after the user has opened the address and logged in.
NATIVE_CLIENT_ID = "5f0c2a9e-41b7-4c4e-9a31-7d2f8e6b1c90"
REFRESH_MARGIN = 60  # seconds: a token this close to its expiry is refreshed first
_CLIENT_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
SET_CLIENT_ID = (
    "set SCISTREAM_CLIENT_ID to the Globus native-app client id your facility's operators give you"
)


def home() -> Path:
    return Path(os.environ.get("SCISTREAM_HOME") or Path.home() / ".scistream").expanduser()


def client_id() -> str:
    return os.environ.get("SCISTREAM_CLIENT_ID") or NATIVE_CLIENT_ID


def registered_client_id() -> str:
    """The client id a login can work with; ConfigError for the placeholder or what is not an id."""
    given = os.environ.get("SCISTREAM_CLIENT_ID", "").strip()
    if not given or given.lower() == NATIVE_CLIENT_ID:
        raise ConfigError(f"s2uc has no registered Globus client id built in yet: {SET_CLIENT_ID}")
    if not _CLIENT_ID.fullmatch(given.lower()):
        raise ConfigError(
            f"SCISTREAM_CLIENT_ID={given!r} is not a Globus client id (a UUID): {SET_CLIENT_ID}"
        )
    return given.lower()


@dataclass(frozen=True)
class Login:
    """A stored token for one scope, and whose it is."""

    scope: str
    access_token: str
    expires_at: int
    identity: str | None

    @property
    def until(self) -> str:
        return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(self.expires_at))


class TokenStore:
    def __init__(self) -> None:
        import globus_sdk
        from globus_sdk.token_storage import JSONTokenStorage

        directory = home()
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.path = directory / "tokens.json"
        self._storage = JSONTokenStorage(self.path, namespace="s2uc")
        self._client = globus_sdk.NativeAppAuthClient(
            client_id(), app_name="SciStream s2uc", retry_config=retry_config()
        )
        self._api_error = globus_sdk.GlobusAPIError
        self._network_error = globus_sdk.NetworkError

    def _globus(self, what: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except self._network_error as exc:
            text = unreachable(exc, self._client.base_url)
            raise Unreachable(f"Globus Auth: {what} failed: {text}") from None
        except self._api_error as exc:
            text = getattr(exc, "message", None) or str(exc)
            raise Unreachable(f"Globus Auth: {what} failed: {text}") from None

    def login(self, scope: str, ask_code: Callable[[str], str]) -> Login:
        """The native-app flow: the user opens the URL, logs in and pastes back the code."""
        self._client.oauth2_start_flow(requested_scopes=scope, refresh_tokens=True)
        url = self._client.oauth2_get_authorize_url()
        code = ask_code(url).strip()
        if not code:
            raise Unauthenticated("no authorization code given; nothing changed")
        tokens = self._globus(
            "exchanging the code", lambda: self._client.oauth2_exchange_code_for_tokens(code)
        )
        self._storage.store_token_response(tokens)
        found = self.find(scope)
        if found is None:
            raise Unauthenticated(f"Globus Auth granted no token for {scope}")
        return found

    def find(self, scope: str) -> Login | None:
        """The stored login for `scope`, refreshed when it is about to expire; None if there is none."""
        for server, data in self._storage.get_token_data_by_resource_server().items():
            if scope not in data.scope.split():
                continue
            if data.expires_at_seconds - REFRESH_MARGIN < time.time():
                if not data.refresh_token:
                    return None
                self._storage.store_token_response(self._refresh(data.refresh_token))
                data = self._storage.get_token_data(server) or data
            return Login(scope, data.access_token, data.expires_at_seconds, data.identity_id)
        return None

    def logout(self, scope: str | None) -> int:
        """Revoke and forget the tokens of `scope` (all when None); how many logins went."""
        gone = 0
        for server, data in self._storage.get_token_data_by_resource_server().items():
            if scope is not None and scope not in data.scope.split():
                continue
            for token in (data.access_token, data.refresh_token):
                if token:
                    self._revoke(token)
            self._storage.remove_token_data(server)
            gone += 1
        return gone

    def _refresh(self, token: str) -> Any:
        return self._globus("refreshing the token", lambda: self._client.oauth2_refresh_token(token))

    def _revoke(self, token: str) -> None:
        self._globus("revoking a token", lambda: self._client.oauth2_revoke_token(token))


def token_for(scope: str) -> str | None:
    found = TokenStore().find(scope)
    return found.access_token if found else None
