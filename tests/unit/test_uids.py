"""The stream's UID as users hand it over: typed, pasted, or in a private file."""

from __future__ import annotations

import io
import os
import stat
from pathlib import Path

import pytest

from scistream.client.uids import UidFile, normalize_uid, read_uid
from scistream.errors import BadRequest, ConfigError

UID = "0b7c1f2e-3d4a-4b5c-8d9e-0f1a2b3c4d5e"
STDIN = Path("-")


@pytest.mark.parametrize("text", [UID, UID.upper(), f"  {UID}\n", UID[:8].upper() + UID[8:]])
def test_a_uid_is_the_same_in_any_case_and_without_blanks(text):
    assert normalize_uid(text) == UID


@pytest.mark.parametrize(
    "text",
    [
        "YOUR_UID",
        UID[:-1],
        UID + "0",
        UID.replace("-", ""),
        "0b7c1f2e-3d4a-1b5c-8d9e-0f1a2b3c4d5e",  # not a version 4 UUID: no S2CS made it
        "",
    ],
)
def test_an_invalid_uid_is_shown_in_full_to_its_owner(text):
    with pytest.raises(BadRequest) as caught:
        normalize_uid(text)
    message = caught.value.message
    assert repr(text.strip()) in message  # all of it: it is the user's own terminal
    assert "is not a stream UID" in message and "s2uc inbound_request" in message
    assert not caught.value.remote  # found here, before any server saw it


def test_a_huge_paste_is_not_echoed_whole():
    with pytest.raises(BadRequest) as caught:
        normalize_uid("x" * 10_000)
    assert len(caught.value.message) < 500


def test_a_uid_file_holds_one_line(tmp_path):
    path = tmp_path / "uid"
    path.write_text(f"{UID.upper()}\n")
    assert read_uid(path, io.StringIO()) == UID
    assert read_uid(STDIN, io.StringIO(f"{UID}\n")) == UID


@pytest.mark.parametrize(
    ("content", "says"),
    [("", "holds no UID"), ("\n\n", "holds no UID"), (f"{UID}\n{UID}\n", "more than the UID")],
)
def test_a_uid_file_that_is_not_one_uid_is_named(tmp_path, content, says):
    path = tmp_path / "uid"
    path.write_text(content)
    with pytest.raises(ConfigError) as caught:
        read_uid(path, io.StringIO())
    assert str(path) in caught.value.message and says in caught.value.message


def test_an_invalid_uid_in_a_file_is_shown_with_the_file(tmp_path):
    path = tmp_path / "uid"
    path.write_text("0B7C1F2E-not-a-uid\n")
    with pytest.raises(BadRequest) as caught:
        read_uid(path, io.StringIO())
    assert f"'0B7C1F2E-not-a-uid' in {path} is not a stream UID" in caught.value.message


def test_a_missing_uid_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match=f"cannot read {tmp_path / 'nope'}: No such file"):
        read_uid(tmp_path / "nope", io.StringIO())
    with pytest.raises(ConfigError, match="stdin holds no UID"):
        read_uid(STDIN, io.StringIO(""))


def test_the_uid_file_is_private_and_appears_only_once_it_is_whole(tmp_path):
    path = tmp_path / "uid"
    target = UidFile.prepare(path)  # before the request: the place is writable
    assert not path.exists()
    target.write(UID)
    assert path.read_text() == f"{UID}\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(os.listdir(tmp_path)) == ["uid"]


def test_an_existing_world_readable_uid_file_is_replaced_by_a_private_one(tmp_path):
    path = tmp_path / "uid"
    path.write_text("old\n")
    path.chmod(0o644)
    UidFile.prepare(path).write(UID)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and path.read_text() == f"{UID}\n"


def test_a_prepared_uid_file_that_is_not_needed_leaves_nothing(tmp_path):
    UidFile.prepare(tmp_path / "uid").discard()
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("name", ["-", "missing/uid"])
def test_a_uid_file_that_cannot_be_written_is_refused_before_the_request(tmp_path, name):
    with pytest.raises(ConfigError) as caught:
        UidFile.prepare(STDIN if name == "-" else tmp_path / name)
    assert "--uid-file" in caught.value.message
