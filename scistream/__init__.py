"""SciStream: authenticated, encrypted, rate-limited data streams between research facilities.

The Python API (docs/python-api.md): `scistream.connect(...)` sets up both sides of a stream and
releases them when its `with` block ends; `scistream.Client(s2cs, server_cert)` talks to one
gateway. Importing this package loads neither the server, the data plane nor cryptography.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("scistream")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

# After __version__: the modules below may read it while this package is still being imported.
from .api import Client, Outcome, Stream, connect, release
from .errors import ScistreamError

__all__ = ["Client", "Outcome", "ScistreamError", "Stream", "__version__", "connect", "release"]
