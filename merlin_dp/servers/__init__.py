"""Model servers that ship with the project, each honouring the replica contract.

The local runtime starts them as ``python -m merlin_dp.servers.<name>`` in a replica's
own process: ``pyfunc`` (a user's class), ``sklearn`` (a saved estimator), ``upi`` (UPI_V1
over gRPC). ``contract`` is what every HTTP one shares (the replica contract's routes,
KServe V1 bodies, metrics); ``v2`` the Open Inference Protocol routes. They import nothing
of the data plane beyond the UPI stubs, so a replica starts fast and alone.
"""
