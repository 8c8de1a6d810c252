"""The gRPC (UPI_V1) front on the gateway's own HTTP/2: proxied calls, their mirror copies,
statuses, and the health service the gateway answers itself (docs/grpc-design.md)."""
