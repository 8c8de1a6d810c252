"""The gateway's own HTTP/2 (h2c, prior knowledge), below the gRPC front: frame-level, on
asyncio protocols, knowing nothing of what its streams carry.

- :mod:`merlin_dp.gateway.h2.frames`: frame types, flags, error codes, serializers;
- :mod:`merlin_dp.gateway.h2.codec`: HPACK decoding behind a cache, stateless literal
  encoding;
- :mod:`merlin_dp.gateway.h2.limits`: what we grant a peer and allow it (``H2Limits``),
  and the token buckets that count it;
- :mod:`merlin_dp.gateway.h2.settings`: the SETTINGS exchange: ours, the peer's, and what
  a SETTINGS frame changes;
- :mod:`merlin_dp.gateway.h2.flow`: flow control: the windows, and crediting what we read;
- :mod:`merlin_dp.gateway.h2.streams`: a stream, its handler, what it asks of its
  connection;
- :mod:`merlin_dp.gateway.h2.connection`: one connection, either end: the frame loop,
  CONTINUATION, the send queue, ending streams and the connection;
- :mod:`merlin_dp.gateway.h2.server`: client-facing connections, their limits, the
  listener.

The replica-facing connections and their pool are :mod:`merlin_dp.gateway.pool.h2`; the
gRPC front on top is :mod:`merlin_dp.gateway.grpc`. See docs/grpc-design.md.
"""
