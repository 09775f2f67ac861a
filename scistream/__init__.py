"""SciStream: authenticated, encrypted, rate-limited data streams between research facilities."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("scistream")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
