"""The Globus Auth scope of an S2CS, as users name it and as servers advertise it.

Facilities hand out the scope *ID* (the S2CS's Globus client id, a UUID); the user guide's
`s2uc login --scope YOUR_SCOPE_ID` takes it, and the S2CS advertises the full scope built from
it. Both ends build that string here, with globus-sdk's scope tools, so they cannot disagree.
Pure: no file, socket or network; globus-sdk's scope classes do no I/O. Importing this module
loads globus-sdk (a third of a second), so commands that may not need it import it late.
"""

from __future__ import annotations

import re
from functools import cached_property
from typing import Any

from globus_sdk.scopes import DynamicScopeCollection, Scope, ScopeParseError

# globus-sdk builds the scopes of its own services (Flows, Timers, GCS collections) with this
# helper; it is what `ScopeBuilder.url_scope_string` was in globus-sdk 3. The unit tests pin its
# output, under the lowest globus-sdk pyproject.toml allows too.
from globus_sdk.scopes.collection import _url_scope

from .errors import ConfigError

_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.IGNORECASE)
# Only hex digits and dashes: meant as an ID, even when a digit was lost in the copy.
_LOOKS_LIKE_ID = re.compile(r"[0-9a-f-]+", re.IGNORECASE)
_EXAMPLE = "https://auth.globus.org/scopes/SCOPE_ID/scistream"
# A word with a capital or an underscore and no ':' or '/': a placeholder of a doc (YOUR_SCOPE_ID),
# copied as it is. Globus scopes are URLs, URNs or lower-case OpenID words (openid, email).
_PLACEHOLDER = re.compile(r"[^:/]*[A-Z_][^:/]*")


class ScistreamScopes(DynamicScopeCollection):
    """The scopes of one S2CS, whose Globus client id is the resource server."""

    _scope_names = ("scistream",)

    @cached_property
    def scistream(self) -> Scope:
        return _url_scope(self.resource_server, "scistream")


def scistream_scope(client_id: str) -> str:
    """The scope an S2CS with this Globus client id requires: .../scopes/ID/scistream."""
    return str(ScistreamScopes(client_id).scistream)


def expand(text: str, name: str = "--scope") -> str:
    """What --scope names: a scope ID becomes its S2CS's scope; one full scope string stays as it is.
    `name`: how the caller's user gives the scope (s2uc's --scope, the API's scope), for messages."""
    text = text.strip()
    takes = f"{name} takes the scope ID of the S2CS (a UUID, from its operators) or one scope like {_EXAMPLE}"
    if not text:
        raise ConfigError(f"the scope is empty: {takes}")
    if _ID.fullmatch(text):
        return scistream_scope(text.lower())
    if _LOOKS_LIKE_ID.fullmatch(text):
        raise ConfigError(f"{text!r} is not a scope ID (8-4-4-4-12 hexadecimal digits): {takes}")
    if _PLACEHOLDER.fullmatch(text):
        raise ConfigError(f"{text!r} stands for a scope ID, it is none: {takes}")
    try:
        scope = Scope.parse(text)
    except (ScopeParseError, ValueError):
        scope = None
    if scope is None or scope.dependencies or scope.optional:
        raise ConfigError(f"{text!r} is not one scope: {takes}")
    return str(scope)


def login_form(scope: str) -> str:
    """How a login hint names `scope`: the ID when it is an S2CS's scope, else the scope itself."""
    parts = scope.split("/")
    candidate = parts[-2] if len(parts) >= 2 else ""
    if _ID.fullmatch(candidate) and candidate == candidate.lower() and scistream_scope(candidate) == scope:
        return candidate
    return scope


def to_bind(auth: Any, named: str | None, server: str) -> str:
    """The scope `s2uc login --s2cs` logs in for and binds to `server`, from the `auth` of its info.

    Only an S2CS's own kind of scope (.../scopes/ID/scistream): a server may advertise anything,
    and a token for, say, Globus Transfer should go to it only when the user names that scope.
    """
    if not isinstance(auth, dict) or not auth.get("enabled"):
        raise ConfigError(f"{server} has authentication off: it needs no login")
    advertised = auth.get("scope")
    try:
        scope = expand(advertised) if isinstance(advertised, str) else None
    except ConfigError:
        scope = None
    if scope is None or scope != advertised:
        raise ConfigError(
            f"{server} advertises no usable scope ({str(advertised)[:80]!r}); tell its operators"
        )
    if named is not None and named != scope:
        raise ConfigError(f"{server} asks for {scope}, not {named}: leave out --scope, or check --s2cs")
    if named is None and login_form(scope) == scope:
        raise ConfigError(
            f"{server} asks for {scope}, which is not the scope of an S2CS (.../scopes/ID/scistream); "
            f"only if its operators told you to log in for it: s2uc login --s2cs {server} --scope {scope}"
        )
    return scope
