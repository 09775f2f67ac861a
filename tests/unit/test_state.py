from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from scistream.errors import ConfigError
from scistream.s2cs.state import StateDir


@pytest.fixture
def short_dir() -> Iterator[Path]:
    # State dir paths are bounded (proxies' Unix sockets live below them): pytest's tmp_path is too long.
    path = Path(tempfile.mkdtemp(prefix="ss-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def held(short_dir: Path) -> Iterator[StateDir]:
    state = StateDir(short_dir / "state")
    state.open()
    yield state
    state.close()


def test_the_state_dir_is_held_by_one_s2cs_and_names_its_pid(held):
    assert held.lock_file.read_text() == f"{os.getpid()}\n"
    assert held.path.stat().st_mode & 0o777 == 0o700
    assert held.sessions.is_dir()


def test_a_second_s2cs_is_refused_with_the_pid_of_the_first_and_changes_nothing(held):
    before = {p: p.stat().st_mtime_ns for p in held.path.rglob("*")}
    with pytest.raises(ConfigError) as caught:
        StateDir(held.path).open()
    assert caught.value.message == (
        f"state dir {held.path} is in use by s2cs pid {os.getpid()}; stop that one first, "
        "or give this one a --state-dir of its own"
    )
    assert {p: p.stat().st_mtime_ns for p in held.path.rglob("*")} == before
    assert held.lock_file.read_text() == f"{os.getpid()}\n"


def test_the_state_dir_is_free_again_once_its_holder_lets_go(held):
    held.close()
    again = StateDir(held.path)
    again.open()
    again.close()


def test_a_state_dir_that_is_a_file_is_refused_in_words(short_dir):
    path = short_dir / "state"
    path.write_text("not a directory\n")
    with pytest.raises(ConfigError, match=f"^state dir {re.escape(str(path))} is not a directory$"):
        StateDir(path).open()
    with pytest.raises(
        ConfigError,
        match=f"^cannot make state dir {re.escape(str(path))}/below: a part of that path is a file$",
    ):
        StateDir(path / "below").open()
    assert path.read_text() == "not a directory\n"


def test_a_sessions_dir_that_is_a_file_is_refused_in_words(short_dir):
    (short_dir / "sessions").write_text("")
    state = StateDir(short_dir)
    with pytest.raises(ConfigError, match=r"^sessions dir \S+ is not a directory$"):
        state.open()
    state.close()
