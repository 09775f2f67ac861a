"""What both ends share of talking to Globus Auth: how often a request is tried, and how a
failure to reach it is told. s2uc's token store and s2cs's token check use it alike.

Imports globus-sdk only when a client is made (retry_config).
"""

from __future__ import annotations

from typing import Any

# A request to Globus Auth is tried twice at most, then fails with its cause: globus-sdk's own
# default (five retries with back-off) kept a user, or a request to a secured s2cs, waiting 11 s
# for an address that refuses every connection.
RETRIES = 1
RETRY_SLEEP = 2.0  # seconds, at most, before the retry


def retry_config() -> Any:
    """How often the clients of globus-sdk here try a request again (RETRIES)."""
    from globus_sdk.transport import RetryConfig

    return RetryConfig(max_retries=RETRIES, max_sleep=RETRY_SLEEP)


def unreachable(exc: BaseException, where: str) -> str:
    """'cannot reach https://auth.globus.org/ (Connection refused)': the address and the innermost
    cause of a network failure, which globus-sdk's own message ('ConnectionError on request') and
    requests' (a paragraph of its pool's state) leave out or bury."""
    cause = ""
    seen: set[int] = set()
    node: BaseException | None = exc
    while node is not None and id(node) not in seen:  # outermost first: the last found is innermost
        seen.add(id(node))
        if isinstance(node, OSError) and (node.strerror or isinstance(node, TimeoutError)):
            cause = node.strerror or str(node) or "timed out"
        node = node.__cause__ or node.__context__
    return f"cannot reach {where}" + (f" ({cause})" if cause else "")
