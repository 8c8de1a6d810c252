"""The two gRPC processes the grpc benchmark starts (``python -m`` each):

- :mod:`~loadtests.bench.grpc_servers.fake_upstream`: the upstream, a fast h2c fake
  answering every call with one fixed response;
- :mod:`~loadtests.bench.grpc_servers.passthrough`: the Python reference, a plain
  ``grpc.aio`` raw-bytes pass-through.
"""
