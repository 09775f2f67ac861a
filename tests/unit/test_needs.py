"""The rule for a test whose need (root, a private network namespace) this machine does not meet:
it fails under CI, and elsewhere it is skipped and named in a loud line at the end of the run."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

CHECKOUT = Path(__file__).resolve().parents[2]

MARKED = """
import pytest

from tests.needs import require_netns

@pytest.mark.needs("netns", reason="adds interfaces")
def test_marked():
    pass

@pytest.fixture
def network():
    require_netns("adds an interface")

def test_by_its_fixture(network):
    pass

def test_needing_nothing():
    pass
"""


def run(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """pytest on MARKED with this suite's settings and hooks, and `env` in place of the namespace
    and CI of the machine that runs this."""
    (tmp_path / "test_marked.py").write_text(MARKED)
    clean = {k: v for k, v in os.environ.items() if k not in ("CI", "SCISTREAM_PRIVATE_NETNS")}
    argv = [sys.executable, "-m", "pytest", "-q", "-p", "tests.conftest", "-c", "pyproject.toml"]
    return subprocess.run(
        [*argv, "--rootdir", str(tmp_path), "-p", "no:cacheprovider", str(tmp_path / "test_marked.py")],
        cwd=CHECKOUT,
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_under_ci_a_test_whose_need_is_not_met_fails_and_says_why(tmp_path):
    result = run(tmp_path, CI="true")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "1 passed, 2 errors" in result.stdout
    assert (
        "needs a private network namespace (adds interfaces): run it as root under scripts/run-isolated"
        in (result.stdout)
    )
    assert "needs a private network namespace (adds an interface)" in result.stdout


def test_elsewhere_it_is_skipped_and_the_run_ends_with_a_loud_line_naming_it(tmp_path):
    result = run(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed, 2 skipped" in result.stdout
    loud = result.stdout[result.stdout.index("2 TEST(S) DID NOT RUN") :]
    assert "1 x needs a private network namespace (adds interfaces)" in loud
    assert "1 x needs a private network namespace (adds an interface)" in loud
    assert "under CI=true each of these fails" in loud


@pytest.mark.parametrize("ci", ["true", ""])
def test_a_test_whose_need_is_met_runs(tmp_path, ci):
    result = run(tmp_path, CI=ci, SCISTREAM_PRIVATE_NETNS="1")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 passed" in result.stdout and "DID NOT RUN" not in result.stdout
