"""merlin-dataplane: the traffic-routing gateway and autoscaling data plane of a model
serving platform. One import package, one room per job (docs/architecture.md has the map
and the arrows between the rooms):

- ``spec``: the contract every edge shares (rule, route table, endpoint specs);
- ``gateway``: the hot path from a model's stable URL to a replica;
- ``controller``: the control plane API, its state and stores, Kubernetes sync;
- ``autoscaler``: signals, policies, actuation through a runtime;
- ``runtime``: where replicas run (local processes, Kubernetes Deployments);
- ``servers``: the model servers that ship, each honouring the replica contract;
- ``cli``: the ``merlin-dp`` command line; ``loadtest``: the Locust suites it runs;
- ``protos``: UPI v1 and its generated stubs; ``common``: small helpers with no domain.
"""

from merlin_dp.common import hot_path

# Before anything imports the hot path: compiled, or its sources when they changed since.
hot_path.install()
