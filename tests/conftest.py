"""Settings for the whole test suite."""

import pytest
from hypothesis import settings

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
