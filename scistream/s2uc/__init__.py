"""`s2uc`, the user client's command line: asks S2CS servers for streams, releases them, shows them.

Built on the Python API (scistream/api.py) and the client library (scistream/client/).
"""
