"""Generated protobuf and grpclib modules (see scripts/gen_proto.py)."""
