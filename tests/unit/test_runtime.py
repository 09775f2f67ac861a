"""The environment proxies get from s2cs (scistream/s2ds/runtime.py)."""

from __future__ import annotations

from scistream.s2ds.runtime import proxy_environment


def test_a_proxy_gets_no_variable_that_names_a_secret():
    environ = {
        "PATH": "/usr/bin",
        "PYTHONPATH": "/opt/scistream",
        "LANG": "C.UTF-8",
        "SCISTREAM_CLIENT_SECRET": "s3cret",
        "GLOBUS_SDK_ENVIRONMENT": "test",
        "AWS_SESSION_TOKEN": "t",
        "DB_PASSWORD": "p",
        "my_credentials": "c",
    }
    assert proxy_environment(environ) == {
        "PATH": "/usr/bin",
        "PYTHONPATH": "/opt/scistream",
        "LANG": "C.UTF-8",
    }
