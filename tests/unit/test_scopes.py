"""The scope a user names with --scope: the guide's scope ID, or a full scope string."""

from __future__ import annotations

import pytest

from scistream.errors import ConfigError
from scistream.scopes import expand, login_form, scistream_scope, to_bind

ID = "3a1b6c2d-0e4f-4a5b-8c7d-9e0f1a2b3c4d"
FULL = f"https://auth.globus.org/scopes/{ID}/scistream"


def test_the_scope_id_of_the_user_guide_becomes_the_scope_the_s2cs_advertises():
    assert expand(ID) == FULL
    assert scistream_scope(ID) == FULL


@pytest.mark.parametrize("text", [ID.upper(), f"  {ID}\n", ID[:8].upper() + ID[8:]])
def test_a_scope_id_copied_in_upper_case_or_with_blanks_is_the_same_id(text):
    assert expand(text) == FULL


@pytest.mark.parametrize(
    "scope",
    [
        FULL,
        "https://auth.globus.org/scopes/0000/other",
        "urn:globus:auth:scope:transfer.api.globus.org:all",
        "openid",
    ],
)
def test_a_full_scope_string_is_taken_as_it_is(scope):
    assert expand(scope) == scope
    assert expand(f" {scope} ") == scope


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "is empty"),
        ("   ", "is empty"),
        (ID[:-1], "not a scope ID"),  # one digit lost in the copy
        (ID + "0", "not a scope ID"),
        ("3a1b6c2d0e4f4a5b8c7d9e0f1a2b3c4d", "not a scope ID"),
        (f"{FULL} openid", "one scope"),
        (f"{FULL}[openid]", "one scope"),
        ("a[", "one scope"),
    ],
)
def test_what_is_neither_an_id_nor_one_scope_is_refused_with_what_to_pass(text, why):
    with pytest.raises(ConfigError) as caught:
        expand(text)
    assert why in caught.value.message
    assert "--scope takes" in caught.value.message


def test_the_login_hint_shows_the_id_of_a_scistream_scope_and_any_other_scope_in_full():
    assert login_form(FULL) == ID
    other = "https://auth.globus.org/scopes/0000/other"
    assert login_form(other) == other
    assert (
        login_form(f"https://auth.globus.org/scopes/{ID}/other")
        == f"https://auth.globus.org/scopes/{ID}/other"
    )
    # What the hint shows, expanded again, is the scope it came from.
    for scope in (FULL, other):
        assert expand(login_form(scope)) == scope


def test_the_server_advertises_the_same_scope_and_its_login_hint_names_the_id():
    from scistream.errors import Unauthenticated
    from scistream.s2cs.auth import GlobusAuth, default_scope

    assert default_scope(ID) == FULL
    with pytest.raises(Unauthenticated) as caught:
        GlobusAuth(ID, "secret").identify(None)
    assert caught.value.message.endswith(f"s2uc login --scope {ID}")


# --- the scope `s2uc login --s2cs` takes from a server's info -------------------------------------


def test_login_at_a_server_takes_the_scistream_scope_it_advertises():
    assert to_bind({"enabled": True, "scope": FULL}, None, "hpc:5000") == FULL
    assert to_bind({"enabled": True, "scope": FULL}, FULL, "hpc:5000") == FULL


@pytest.mark.parametrize(
    ("auth", "named", "says"),
    [
        ({"enabled": False, "scope": None}, None, "hpc:5000 has authentication off"),
        (None, None, "hpc:5000 has authentication off"),
        ({"enabled": True, "scope": None}, None, "advertises no usable scope"),
        ({"enabled": True, "scope": ID}, None, "advertises no usable scope"),  # an ID is not a scope
        ({"enabled": True, "scope": f"{FULL} openid"}, None, "advertises no usable scope"),
        ({"enabled": True, "scope": FULL}, "https://auth.globus.org/scopes/x/y", f"asks for {FULL}, not"),
        (
            {"enabled": True, "scope": "urn:globus:auth:scope:transfer.api.globus.org:all"},
            None,
            "--scope urn:globus:auth:scope:transfer.api.globus.org:all",
        ),
    ],
)
def test_login_at_a_server_refuses_what_it_should_not_bind(auth, named, says):
    with pytest.raises(ConfigError) as caught:
        to_bind(auth, named, "hpc:5000")
    assert says in caught.value.message


@pytest.mark.parametrize("text", ["YOUR_SCOPE_ID", "SCOPE_ID", "Scope"])
def test_the_docs_placeholder_is_not_taken_for_a_scope(text):
    """README's `s2uc login --scope YOUR_SCOPE_ID`, copied as it is: no Globus address is built."""
    with pytest.raises(ConfigError) as caught:
        expand(text)
    assert caught.value.message == (
        f"{text!r} stands for a scope ID, it is none: --scope takes the scope ID of the S2CS (a UUID, "
        "from its operators) or one scope like https://auth.globus.org/scopes/SCOPE_ID/scistream"
    )


def test_the_python_api_names_its_own_parameter():
    with pytest.raises(ConfigError) as caught:
        expand("", "scope")
    assert caught.value.message.startswith("the scope is empty: scope takes the scope ID")
