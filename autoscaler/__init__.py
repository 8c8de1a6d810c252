"""The autoscaler: signals, windows, policies and actuation.

Built so far: :mod:`autoscaler.policy`, the scaling decisions as pure functions (KPA for
rps and concurrency, HPA for utilization). Signal collection, the decision loop,
activation at zero and the simulator arrive with the rest of the autoscaler issue.
"""
