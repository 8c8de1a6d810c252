"""Kubernetes mode: route tables from ModelEndpoints and EndpointSlices, scaling through
the scale subresource, leader election on a Lease (docs/kubernetes.md)."""
