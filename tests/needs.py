"""What a test needs of the machine it runs on, and one rule for when the machine lacks it.

Some tests need root (to mount a tmpfs, to run a program as another user) or a private network
namespace (to add interfaces; scripts/run-isolated makes one). Mark such a test
`@pytest.mark.needs("root", reason="mounting a tmpfs")`, or call `require_root(reason)` from a
fixture. The rule is the same either way: under CI (`CI=true`) a need not met FAILS the test, since
CI runs every test and a skip there hides a failure; elsewhere the test is SKIPPED, and the run ends
with a loud summary of what did not run and why (tests/conftest.py).
"""

import os
import shutil
from collections.abc import Callable
from typing import NoReturn

import pytest

NETNS = "SCISTREAM_PRIVATE_NETNS"  # set to 1 by scripts/run-isolated, as root, in its namespace
# Every skip of this module starts so: the summary at the end of a run finds them by it.
SKIPPED = "needs "
# A need named in a marker: what it is, in words, and what the machine lacks when it is not met
# (None when it is met).
WHAT: dict[str, tuple[str, Callable[[], str | None]]] = {
    "root": ("root", lambda: None if os.geteuid() == 0 else "this run is not root's"),
    "netns": (
        "a private network namespace",
        lambda: None if os.environ.get(NETNS) == "1" else "run it as root under scripts/run-isolated",
    ),
}


def under_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def lacking(need: str, reason: str, why: str) -> NoReturn:
    """Fail under CI, skip elsewhere: `reason` says what the test does that needs it."""
    _stop(f"{SKIPPED}{need} ({reason}): {why}")


def _stop(message: str) -> NoReturn:
    if under_ci():
        pytest.fail(f"{message} (CI=true: a test that cannot run fails)", pytrace=False)
    pytest.skip(message)


def unmet(need: str, reason: str) -> str | None:
    """Why this machine does not meet `need` (a skip's message), or None when it does."""
    if need not in WHAT:
        raise ValueError(f"unknown need {need!r}: one of {', '.join(WHAT)}")
    words, lacks = WHAT[need]
    why = lacks()
    return None if why is None else f"{SKIPPED}{words} ({reason}): {why}"


def require(need: str, reason: str) -> None:
    if (message := unmet(need, reason)) is not None:
        _stop(message)


def require_root(reason: str) -> None:
    require("root", reason)


def require_netns(reason: str) -> None:
    require("netns", reason)


def require_command(name: str, reason: str) -> None:
    if shutil.which(name) is None:
        lacking(f"the command {name}", reason, "not on PATH")
