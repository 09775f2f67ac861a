"""What s2cs sends when a reply cannot be sent as it is."""

from __future__ import annotations

import json

from scistream.protocol import MAX_MESSAGE
from scistream.s2cs.server import _framed


def test_a_reply_over_64_kib_is_replaced_by_an_error_the_client_can_read():
    """Before, the connection closed with nothing sent, and the client said the server had not
    answered; asyncio logged an exception nobody retrieved."""
    line = _framed({"ok": True, "text": "x" * MAX_MESSAGE}, "192.0.2.1:4000")
    assert len(line) <= MAX_MESSAGE and line.endswith(b"\n")
    assert json.loads(line)["error"]["code"] == "INTERNAL"
    assert _framed({"ok": True}, "192.0.2.1:4000") == b'{"ok":true}\n'
