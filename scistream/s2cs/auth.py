"""Who is asking: bearer tokens checked with Globus Auth, or no authentication at all.

With a client id and secret, every request's token is introspected with globus-sdk (the answer is
cached for a minute, never past the token's expiry): it must be active and carry this server's
scope, and its identity becomes the owner of the streams it creates. When the policy names Globus
groups, the identity's groups are looked up too, with a dependent token for the Groups API.
A refused token is refused again for a while without asking Globus, and a client address that
sends many refused tokens must wait, so a flood of bogus tokens cannot exhaust this server's
allowance at Globus Auth and lock everyone out. globus-sdk reads its own
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
from ..globus import retry_config, unreachable

log = logging.getLogger(__name__)

CACHE_SECONDS = 60.0
REFUSED_SECONDS = 30.0  # a refused token is refused again, without asking Globus, for this long
FAILURES_PER_CLIENT = 20  # refused tokens per client address within FAILURE_WINDOW; then it waits
FAILURE_WINDOW = 60.0
GROUPS_RESOURCE_SERVER = "groups.api.globus.org"


@dataclass(frozen=True)
class Identity:
    id: str  # stable subject id; sessions are owned by it
    name: str  # for logs and listings
    groups: frozenset[str] | None = frozenset()  # Globus group ids; None: they could not be looked up


class Authenticator(Protocol):
    @property
    def enabled(self) -> bool: ...

    @property
    def scope(self) -> str | None: ...

    def identify(self, token: str | None, client: str = "") -> Identity | None:
        """The identity behind `token` sent from address `client`, None when authentication is
        off; raises Unauthenticated."""
        ...


class NoAuth:
    enabled = False
    scope = None

    def identify(self, token: str | None, client: str = "") -> Identity | None:
        return None


def default_scope(client_id: str) -> str:
    """The scope this server advertises: built as `s2uc` expands a scope ID, so the two agree."""
    from ..scopes import scistream_scope  # loads globus-sdk: only with authentication on

    return scistream_scope(client_id)


class GlobusAuth:
    enabled = True

    def __init__(self, client_id: str, client_secret: str, scope: str | None = None) -> None:
        import globus_sdk  # only servers with authentication on need it loaded

        from ..scopes import login_form

        self.scope = scope or default_scope(client_id)
        # The login hint names the scope ID, as facilities hand it out and the user guide writes it.
        self._login = f"s2uc login --scope {login_form(self.scope)}"
        self._client = globus_sdk.ConfidentialAppAuthClient(
            client_id, client_secret, retry_config=retry_config()
        )
        # Its warning of a failed request ("request done (fail, error)") says less than the line
        # logged here with the address and the cause, and came before it.
        logging.getLogger("globus_sdk.transport").setLevel(logging.ERROR)
        self._api_error = globus_sdk.GlobusAPIError
        self._network_error = globus_sdk.NetworkError
        self._cache: dict[str, tuple[float, Identity]] = {}  # sha256(token) -> (valid until, who)
        self._refused: dict[str, tuple[float, str]] = {}  # sha256(token) -> (until, the reason)
        self._failures: dict[str, list[float]] = {}  # client address -> when its tokens were refused
        self._lock = threading.Lock()
        self.lookup_groups = False  # set when the policy names groups
        self._groups_client = globus_sdk.GroupsClient
        self._authorizer = globus_sdk.AccessTokenAuthorizer

    def identify(self, token: str | None, client: str = "") -> Identity | None:
        login = self._login
        if not token:
            raise Unauthenticated(f"this server requires a Globus login: {login}")
        key = hashlib.sha256(token.encode()).hexdigest()  # no token kept in memory longer than needed
        now = time.time()
        with self._lock:
            cached = self._cache.get(key)
            if cached and cached[0] > now:
                return cached[1]
            refused = self._refused.get(key)
            if refused and refused[0] > now:
                raise Unauthenticated(refused[1])
            recent = [t for t in self._failures.get(client, []) if t > now - FAILURE_WINDOW]
            if client and len(recent) >= FAILURES_PER_CLIENT:
                raise Unauthenticated(
                    f"too many refused tokens from {client} in the last minute; wait a minute: {login}"
                )
        try:
            who, until = self._check(token, now)
        except Unauthenticated as exc:
            with self._lock:
                self._refused = {k: v for k, v in self._refused.items() if v[0] > now}
                self._refused[key] = (now + REFUSED_SECONDS, exc.message)
                self._failures[client] = [*recent, now]
                self._failures = {
                    c: times for c, times in self._failures.items() if times[-1] > now - FAILURE_WINDOW
                }
            raise
        with self._lock:
            self._cache = {k: v for k, v in self._cache.items() if v[0] > now}
            self._cache[key] = (until, who)
        return who

    def _check(self, token: str, now: float) -> tuple[Identity, float]:
        """Who holds `token`, and until when that answer may be cached."""
        login = self._login
        info = self._introspect(token)
        if not info.get("active"):
            raise Unauthenticated(f"your token is expired or revoked: {login}")
        scopes = str(info.get("scope", "")).split()
        if self.scope not in scopes:
            raise Unauthenticated(f"your token is not for this server's scope: {login}")
        who = Identity(id=str(info.get("sub")), name=str(info.get("username") or info.get("sub")))
        until = min(now + CACHE_SECONDS, float(info.get("exp") or now + CACHE_SECONDS))
        if self.lookup_groups:
            groups = self._groups(token, who)
            who = Identity(who.id, who.name, groups)
            if groups is None:  # Groups may answer again soon
                until = min(until, now + REFUSED_SECONDS)
        return who, until

    def _groups(self, token: str, who: Identity) -> frozenset[str] | None:
        """The groups `who` is an active member of, through a dependent token for the Groups API
        (the scope of this server must list the Groups scope as a dependent scope)."""
        from globus_sdk.scopes import GroupsScopes

        try:
            tokens = self._client.oauth2_get_dependent_tokens(
                token, scope=str(GroupsScopes.view_my_groups_and_memberships)
            )
            groups_token = tokens.by_resource_server[GROUPS_RESOURCE_SERVER]["access_token"]
            groups = self._groups_client(
                authorizer=self._authorizer(groups_token), retry_config=retry_config()
            )
            return frozenset(str(g["id"]).lower() for g in groups.get_my_groups(statuses="active"))
        except (self._api_error, self._network_error, KeyError) as exc:
            log.error("cannot look up the Globus groups of %s: %s", who.name, exc)
            return None

    def _introspect(self, token: str) -> dict[str, Any]:
        try:
            return dict(self._client.oauth2_token_introspect(token).data)
        except self._api_error as exc:
            log.error("Globus Auth refused to introspect a token: %s", exc)
            raise Internal("Globus Auth refused this server's credentials; tell its operator") from None
        except self._network_error as exc:
            log.error("cannot check a token: Globus Auth: %s", unreachable(exc, self._client.base_url))
            raise Internal(
                "this server cannot reach Globus Auth right now to check your token; try again later, "
                "or tell its operator if it lasts"
            ) from None
