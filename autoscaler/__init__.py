"""The autoscaler: signals, policies and actuation (arrives with the autoscaler issue)."""
