"""How a message asks its reader for a setting: by s2uc's option, or by the Python API's parameter.

The client library serves both: `s2uc` users fix a command line (--server_cert), programs a call
(server_cert=). Pure: names only.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Names:
    """The reader's names of the settings that messages of the client library ask for."""

    s2cs: str  # the gateway's address
    server_cert: str  # the file of its certificate
    give_cert: str  # the request for that file, as a phrase
    scope: str
    accept_new_cert: str


S2UC = Names(
    s2cs="--s2cs",
    server_cert="--server_cert",
    give_cert="pass --server_cert with the certificate of the S2CS",
    scope="--scope",
    accept_new_cert="--accept-new-cert",
)
PYTHON = Names(
    s2cs="the S2CS address",
    server_cert="server_cert",
    give_cert="pass server_cert the certificate of the S2CS",
    scope="scope",
    accept_new_cert="accept_new_cert=True",
)
