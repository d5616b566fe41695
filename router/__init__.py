"""The front door: the gRPC server, request validation, routing, and the life of a request across the workers."""
