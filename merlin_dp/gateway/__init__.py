"""The gateway: the hot path from a model's stable URL to a version endpoint's replica.

- ``routing/``: the compiled route table (``table``), version choice (``choice``), replica
  choice (``balancer``) and where tables come from (``sources``);
- ``http/``: the HTTP_JSON front (``server``, ``proxy``, ``relay``, ``mirror``);
- ``grpc/``: the UPI_V1 front on the gateway's own HTTP/2 (``proxy``, ``request``,
  ``mirror``, ``health``, ``status``);
- ``h2/``: HTTP/2 itself (frames, HPACK, settings, flow control, streams, connections);
- ``pool/``: replicas as the gateway sees them (health, load, ejection) and a connection
  pool per protocol;
- at the root: activation (requests held for a version at zero), answer comparison for
  mirroring, counters, their snapshots and exposition, autoscaling signals, the worker,
  the supervisor of several workers, the admin port, settings and error answers.
"""
