"""The gateway's gRPC (UPI_V1) path: a frame-level HTTP/2 (h2c) proxy on asyncio protocols.

- :mod:`gateway.h2.frames`: frame types, flags, error codes, serializers;
- :mod:`gateway.h2.codec`: HPACK decoding behind a cache, stateless literal encoding;
- :mod:`gateway.h2.connection`: what both ends share (parsing, SETTINGS, PING, flow
  control, send queues);
- :mod:`gateway.h2.server`: client-facing connections, limits, the listener;
- :mod:`gateway.h2.client`: pooled connections to replicas;
- :mod:`gateway.h2.grpc`: one proxied call: routing, retries, deadline, metrics;
- :mod:`gateway.h2.mirror`: the shadow copy and its comparison.

See docs/grpc-design.md.
"""
