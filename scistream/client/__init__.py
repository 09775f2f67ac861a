"""The client library: what any SciStream client needs to ask an S2CS for streams.

Which server (address.py), who may answer for it (trust.py), one request to it and the token
that goes with it (transport.py), what its replies say (replies.py, reports.py), what the user
keeps of each server (servers.py), the user's Globus tokens (tokens.py) and UID files (uids.py).
The Python API (scistream/api.py) is built on it, and `s2uc` on the API. It imports nothing of
them, nor of the server (scistream.s2cs) or the data plane (scistream.s2ds).
"""
