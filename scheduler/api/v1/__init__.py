"""``moe_scheduler.v1``: messages (``scheduler_pb2``) and stubs (``scheduler_pb2_grpc``)."""
