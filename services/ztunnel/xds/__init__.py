"""The delta xDS client (client.py) and the protobuf -> domain conversion (convert.py)."""
