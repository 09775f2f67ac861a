"""Who is asking: bearer tokens checked against Globus Auth, or no authentication at all."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


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
