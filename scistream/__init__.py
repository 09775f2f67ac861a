"""SciStream: authenticated, encrypted, rate-limited data streams between research facilities.

The Python API (docs/python-api.md): `scistream.connect(...)` sets up both sides of a stream and
releases them when its `with` block ends; `scistream.Client(s2cs, server_cert)` talks to one
gateway. Importing this package loads neither the server, the data plane nor cryptography.

The API is loaded at its first use, not with the package: the shaper, a process every
rate-limited stream starts, imports `scistream.s2ds.shaper` and needs none of it.
"""

from __future__ import annotations

TYPE_CHECKING = False  # not typing's: importing typing costs each command of s2uc some 5 ms

__version__ = "0.1.0"  # the one place of the version (pyproject.toml reads it here)

if TYPE_CHECKING:
    from typing import Any

    from .api import Client, Outcome, Stream, connect, release
    from .errors import ScistreamError

__all__ = ["Client", "Outcome", "ScistreamError", "Stream", "__version__", "connect", "release"]
_API = {"Client", "Outcome", "Stream", "connect", "release"}


def __getattr__(name: str) -> Any:
    if name in _API:
        from . import api

        return getattr(api, name)
    if name == "ScistreamError":
        from .errors import ScistreamError

        return ScistreamError
    raise AttributeError(f"module 'scistream' has no attribute {name!r}")
