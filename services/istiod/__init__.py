"""The istiod stub: the control plane of the local stack.

world.py (world model + validation) -> derive.py (istiod-like derivation of xDS resources) -> store.py (the
current world, atomic mutations, change notification) -> server.py (delta ADS, CA, pod watch, world admin over
gRPC) -> app.py (the `istiod-stub` process). ca.py is the certificate authority; testing.py runs the stub
in-process for tests.
"""
