"""The gRPC (UPI_V1) front, on the gateway's own HTTP/2 (:mod:`merlin_dp.gateway.h2`).

- :mod:`merlin_dp.gateway.grpc.proxy`: the acceptor of the gRPC listener and one proxied
  call: routing, dispatch, retries, deadline, metrics;
- :mod:`merlin_dp.gateway.grpc.request`: what a request's header block says (authority,
  deadline, metadata), read once per distinct block;
- :mod:`merlin_dp.gateway.grpc.mirror`: the shadow copy of a call and the comparison of
  the two answers;
- :mod:`merlin_dp.gateway.grpc.health`: ``grpc.health.v1.Health``, answered by the gateway;
- :mod:`merlin_dp.gateway.grpc.status`: gRPC statuses and the header blocks that carry
  them.

See docs/grpc-design.md.
"""
