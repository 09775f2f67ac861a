from __future__ import annotations

import pytest

from scistream.errors import (
    WIRE_ERRORS,
    BackendFailed,
    BadRequest,
    ConfigError,
    Conflict,
    ExitStatus,
    Forbidden,
    Internal,
    NoPorts,
    NotFound,
    ScistreamError,
    Unauthenticated,
    Unreachable,
    Unsupported,
    from_wire,
)

# What a script calling s2uc learns from the exit status of each error.
EXPECTED = {
    "BAD_REQUEST": (BadRequest, ExitStatus.USAGE),  # fix the command line
    "UNAUTHENTICATED": (Unauthenticated, ExitStatus.AUTH),  # log in
    "FORBIDDEN": (Forbidden, ExitStatus.AUTH),
    "NOT_FOUND": (NotFound, ExitStatus.NOT_FOUND),
    "CONFLICT": (Conflict, ExitStatus.UNAVAILABLE),  # try again later, or elsewhere
    "NO_PORTS": (NoPorts, ExitStatus.UNAVAILABLE),
    "UNSUPPORTED": (Unsupported, ExitStatus.UNAVAILABLE),
    "BACKEND_FAILED": (BackendFailed, ExitStatus.ERROR),  # the server failed
    "INTERNAL": (Internal, ExitStatus.ERROR),
}


def test_every_documented_wire_code_is_known():
    assert set(WIRE_ERRORS) == set(EXPECTED)


@pytest.mark.parametrize("code", sorted(EXPECTED))
def test_a_wire_code_comes_back_as_its_class_with_its_exit_status(code):
    cls, status = EXPECTED[code]
    err = from_wire(code, "no free port in 5100-5200")
    assert type(err) is cls
    assert err.code == code
    assert err.message == "no free port in 5100-5200"
    assert str(err) == "no free port in 5100-5200"
    assert err.exit_status == status


def test_no_error_exits_with_success():
    for cls in [*WIRE_ERRORS.values(), Unreachable, ConfigError, ScistreamError]:
        assert cls.exit_status != ExitStatus.OK, cls


def test_a_script_can_tell_the_kinds_of_failure_apart_by_exit_status_alone():
    fix_request, log_in, no_such_stream, try_later, server_failed, no_answer = (
        BadRequest.exit_status,
        Unauthenticated.exit_status,
        NotFound.exit_status,
        NoPorts.exit_status,
        BackendFailed.exit_status,
        Unreachable.exit_status,
    )
    statuses = [fix_request, log_in, no_such_stream, try_later, server_failed, no_answer]
    assert len(set(statuses)) == len(statuses)


def test_client_side_errors_have_their_own_status_and_never_travel_on_the_wire():
    assert Unreachable("x").exit_status == ExitStatus.UNREACHABLE
    assert ConfigError("x").exit_status == ExitStatus.USAGE
    assert "UNREACHABLE" not in WIRE_ERRORS
    assert "CONFIG" not in WIRE_ERRORS


def test_an_unknown_code_becomes_a_generic_error_that_keeps_the_code():
    err = from_wire("QUOTA_EXCEEDED", "at most 3 streams per user")
    assert type(err) is ScistreamError
    assert err.code == "QUOTA_EXCEEDED"
    assert err.message == "at most 3 streams per user"
    assert err.exit_status == ExitStatus.ERROR
    # The code belongs to that one error, not to every later one.
    assert ScistreamError.code == "INTERNAL"
    assert ScistreamError("x").code == "INTERNAL"


def test_every_error_is_a_scistream_error():
    for cls in [*WIRE_ERRORS.values(), Unreachable, ConfigError]:
        assert issubclass(cls, ScistreamError)
