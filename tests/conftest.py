"""Settings for the whole test suite."""

from collections import Counter
from collections.abc import Iterator

import pytest
from hypothesis import settings

from tests.needs import SKIPPED, require, under_ci, unmet

# Hypothesis fails an example that takes longer than 200 ms by default: a timed assertion, which
# a busy 2-core machine fails now and then (a parser example once took 357 ms under load). What
# the properties assert is correctness; `make bench` is where speed is measured.
settings.register_profile("scistream", deadline=None)
settings.load_profile("scistream")


@pytest.fixture(autouse=True)
def _scistream_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test's s2uc keeps its tokens and pinned certificates apart from the user's: the
    gateways of the tests come and go on ports taken at run time, each with a certificate of its
    own, and a pin left by one test would refuse the next gateway on that port. A test that
    names SCISTREAM_HOME itself sets it after this."""
    monkeypatch.setenv("SCISTREAM_HOME", str(tmp_path_factory.mktemp("scistream-home")))


def _needs(item: pytest.Item) -> Iterator[tuple[str, str]]:
    """The (need, reason) of each `@pytest.mark.needs("root" | "netns", reason=...)` of a test."""
    for mark in item.iter_markers("needs"):
        if len(mark.args) != 1 or not mark.kwargs.get("reason"):
            raise pytest.UsageError(f'{item.nodeid}: write @pytest.mark.needs("root", reason="what it does")')
        yield mark.args[0], mark.kwargs["reason"]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Outside CI, a test whose need is not met is skipped, under its own name and line."""
    if under_ci():
        return
    for item in items:
        for need, reason in _needs(item):
            if (message := unmet(need, reason)) is not None:
                item.add_marker(pytest.mark.skip(reason=message))


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Under CI, a test whose need is not met fails with the reason, before any of its fixtures
    is made (tests/needs.py). Elsewhere it was marked to be skipped at collection."""
    if not under_ci():
        return
    for need, reason in _needs(item):
        require(need, reason)


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> Iterator[None]:
    """A loud last word on the tests this machine could not run, after pytest's own summary (so
    right above the counts): a skip is easy to miss in a line of dots, and each of these is
    something `make test` checks that this run did not."""
    yield
    missed: Counter[str] = Counter()
    for report in terminalreporter.stats.get("skipped", []):
        if isinstance(report.longrepr, tuple):
            message = str(report.longrepr[2]).removeprefix("Skipped: ")
            if message.startswith(SKIPPED):
                missed[message] += 1
    if not missed:
        return
    total = sum(missed.values())
    terminalreporter.write_sep(
        "!", f"{total} TEST(S) DID NOT RUN: THIS MACHINE LACKS WHAT THEY NEED", red=True
    )
    for message, count in sorted(missed.items()):
        terminalreporter.write_line(f"{count:4d} x {message}", yellow=True)
    if not under_ci():
        terminalreporter.write_line("(under CI=true each of these fails: CI runs every test)")
