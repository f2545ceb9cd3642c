"""Generated gRPC code of ``protos/`` (``make protos``); do not edit ``v1/*_pb2*``."""
