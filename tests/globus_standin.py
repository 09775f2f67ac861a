"""A local HTTPS stand-in for Globus Auth, for tests only.

It answers the few OAuth2 endpoints SciStream's real client and server code call through
globus-sdk: the native-app code exchange (with PKCE), refresh, revocation and, for confidential
clients, introspection and dependent tokens; and, as Globus Groups, `my_groups` (the groups a user
belongs to are in `groups`). globus-sdk is pointed at it with its own environment variables:

    GLOBUS_SDK_SERVICE_URL_AUTH=https://127.0.0.1:PORT/   GLOBUS_SDK_SERVICE_URL_GROUPS=(the same)
    GLOBUS_SDK_VERIFY_SSL=<its certificate>

A test plays the user by opening the authorize address (`authorize`), as a browser would, and
gets the code the user would paste.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import ssl
import threading
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from scistream.s2cs.certs import generate

DEPENDENT_GRANT = "urn:globus:auth:grant_type:dependent_token"
GROUPS_SCOPE = "urn:globus:auth:scope:groups.api.globus.org:view_my_groups_and_memberships"


@dataclass
class Grant:
    user: str
    scope: str
    client_id: str
    expires_at: float
    revoked: bool = False


@dataclass
class GlobusStandIn:
    directory: Path
    confidential: dict[str, str] = field(default_factory=dict)  # client id -> secret
    token_lifetime: int = 48 * 3600
    codes: dict[str, dict[str, str]] = field(default_factory=dict)
    access: dict[str, Grant] = field(default_factory=dict)
    refresh: dict[str, Grant] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)
    # (confidential client, token) of every introspection: which server was handed which token.
    introspected: list[tuple[str, str]] = field(default_factory=list)
    groups: dict[str, list[str]] = field(default_factory=dict)  # user -> ids of its groups
    groups_tokens: dict[str, str] = field(default_factory=dict)  # dependent token -> user
    # Cleared by a test, every introspection waits until it is set again: a request stays under
    # way at the server for as long as the test needs.
    answering: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.answering.set()

    def start(self) -> GlobusStandIn:
        self.cert = self.directory / "globus.crt"
        generate(self.cert, self.directory / "globus.key", "127.0.0.1")
        standin = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                url = urllib.parse.urlsplit(self.path)
                standin.count(url.path)
                if url.path == "/v2/groups/my_groups":
                    query = dict(urllib.parse.parse_qsl(url.query))
                    return self.reply(*standin.my_groups(self.headers.get("Authorization", ""), query))
                if url.path != "/v2/oauth2/authorize":
                    return self.reply(404, {"error": "not_found"})
                query = dict(urllib.parse.parse_qsl(url.query))
                code = secrets.token_hex(12)
                standin.codes[code] = query
                body = code.encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                form = dict(urllib.parse.parse_qsl(self.rfile.read(length).decode()))
                path = urllib.parse.urlsplit(self.path).path
                standin.count(path)
                status, body = standin.handle(path, form, self.headers.get("Authorization", ""))
                self.reply(status, body)

            def reply(self, status: int, body: object) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.cert, self.directory / "globus.key")
        self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        self.url = f"https://127.0.0.1:{self.server.server_address[1]}/"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    @property
    def env(self) -> dict[str, str]:
        return {
            "GLOBUS_SDK_SERVICE_URL_AUTH": self.url,
            "GLOBUS_SDK_SERVICE_URL_GROUPS": self.url,
            "GLOBUS_SDK_VERIFY_SSL": str(self.cert),
        }

    def count(self, path: str) -> None:
        self.calls[path] = self.calls.get(path, 0) + 1

    def authorize(self, address: str, user: str) -> str:
        """What a browser does: open the address the client printed, log in as `user`; the code."""
        assert address.startswith(self.url), address
        ctx = ssl.create_default_context(cafile=str(self.cert))
        with urllib.request.urlopen(f"{address}&standin_user={user}", context=ctx) as response:  # noqa: S310
            return response.read().decode()

    def issue(self, user: str, scope: str, client_id: str = "native-app") -> str:
        """An access token, as `s2uc login` would have got it: for tests that need no login."""
        return str(self._tokens(user, scope, client_id, None)["access_token"])

    # --- the endpoints --------------------------------------------------------------------------

    def handle(self, path: str, form: dict[str, str], authorization: str) -> tuple[int, object]:
        if path == "/v2/oauth2/token" and form.get("grant_type") == DEPENDENT_GRANT:
            return self._dependent(form, authorization)
        if path == "/v2/oauth2/token":
            if form.get("grant_type") == "authorization_code":
                return self._exchange(form)
            if form.get("grant_type") == "refresh_token":
                grant = self.refresh.get(form.get("refresh_token", ""))
                if grant is None or grant.revoked:
                    return 400, {"error": "invalid_grant"}
                return 200, self._tokens(grant.user, grant.scope, grant.client_id, form["refresh_token"])
        if path == "/v2/oauth2/token/revoke":
            for table in (self.access, self.refresh):
                if form.get("token") in table:
                    table[form["token"]].revoked = True
            return 200, {"active": False}
        if path == "/v2/oauth2/token/introspect":
            self.answering.wait(60)
            server = self._confidential(authorization)
            if server is None:
                return 401, {"error": "invalid_client"}
            self.introspected.append((server, form.get("token", "")))
            grant = self.access.get(form.get("token", ""))
            if grant is None or grant.revoked or grant.expires_at < time.time():
                return 200, {"active": False}
            return 200, {
                "active": True,
                "scope": grant.scope,
                "sub": f"{grant.user}-0000-identity",
                "username": f"{grant.user}@example.org",
                "exp": int(grant.expires_at),
                "client_id": grant.client_id,
            }
        return 404, {"error": "not_found"}

    def _dependent(self, form: dict[str, str], authorization: str) -> tuple[int, object]:
        """Dependent tokens: only for a confidential client, and (here) only for Groups."""
        if not self._confidential(authorization):
            return 401, {"error": "invalid_client"}
        grant = self.access.get(form.get("token", ""))
        if grant is None or grant.revoked or grant.expires_at < time.time():
            return 400, {"error": "invalid_grant"}
        token = secrets.token_hex(20)
        self.groups_tokens[token] = grant.user
        return 200, [
            {
                "access_token": token,
                "resource_server": "groups.api.globus.org",
                "scope": GROUPS_SCOPE,
                "expires_in": 3600,
                "token_type": "Bearer",
            }
        ]

    def my_groups(self, authorization: str, query: dict[str, str]) -> tuple[int, object]:
        user = self.groups_tokens.get(authorization.removeprefix("Bearer "))
        if user is None:
            return 401, {"error": "unauthorized"}
        if query.get("statuses", "active") != "active":
            return 400, {"error": "the stand-in answers statuses=active only"}
        return 200, [
            {
                "id": group,
                "name": f"group {group[:8]}",
                "my_memberships": [{"status": "active", "role": "member"}],
            }
            for group in self.groups.get(user, [])
        ]

    def _exchange(self, form: dict[str, str]) -> tuple[int, dict]:
        request = self.codes.pop(form.get("code", ""), None)
        if request is None:
            return 400, {"error": "invalid_grant"}
        verifier = form.get("code_verifier", "")
        challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
        if challenge != request.get("code_challenge"):
            return 400, {"error": "invalid_grant", "error_description": "PKCE verification failed"}
        return 200, self._tokens(request["standin_user"], request["scope"], request["client_id"], None)

    def _tokens(self, user: str, scope: str, client_id: str, refresh: str | None) -> dict:
        access = secrets.token_hex(20)
        refresh = refresh or secrets.token_hex(20)
        grant = Grant(user, scope, client_id, time.time() + self.token_lifetime)
        self.access[access] = grant
        self.refresh[refresh] = grant
        resource_server = scope.split("/scopes/")[-1].split("/")[0] if "/scopes/" in scope else scope
        return {
            "access_token": access,
            "refresh_token": refresh,
            "scope": scope,
            "resource_server": resource_server,
            "expires_in": self.token_lifetime,
            "token_type": "Bearer",
            "state": "_default",
            "other_tokens": [],
        }

    def _confidential(self, authorization: str) -> str | None:
        """The confidential client the request authenticates as, None if it does not."""
        if not authorization.startswith("Basic "):
            return None
        client_id, _, secret = base64.b64decode(authorization[6:]).decode().partition(":")
        return client_id if self.confidential.get(client_id) == secret else None
