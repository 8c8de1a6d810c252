"""The Kubernetes objects this project reads and writes: names, labels, and their specs.

A ModelEndpoint (``merlin-dp.caraml.dev/v1alpha1``) holds one model's routing rule; its
``spec`` is :class:`~merlin_dp.spec.endpoints.ModelEndpointSpec`, validated exactly as the
controller API validates a rule. Version endpoints are Services (and their EndpointSlices)
carrying the three :data:`PROJECT_LABEL`/:data:`MODEL_LABEL`/:data:`VERSION_LABEL` labels; the
Deployment scaled for a version has the Service's name. ``deploy/generate_crd.py``
writes the CRD from the models here.
"""

from __future__ import annotations

GROUP = "merlin-dp.caraml.dev"
VERSION = "v1alpha1"
KIND = "ModelEndpoint"
PLURAL = "modelendpoints"
SINGULAR = "modelendpoint"
SHORT_NAMES = ["me"]

PROJECT_LABEL = "merlin-dp.caraml.dev/project"
MODEL_LABEL = "merlin-dp.caraml.dev/model"
VERSION_LABEL = "merlin-dp.caraml.dev/version"
# Autoscaling of a version endpoint, as labels on its Service (the EndpointSlice
# controller copies them onto the slices, which is all the controller reads).
MIN_REPLICAS_LABEL = "merlin-dp.caraml.dev/min-replicas"
MAX_REPLICAS_LABEL = "merlin-dp.caraml.dev/max-replicas"
METRIC_LABEL = "merlin-dp.caraml.dev/metric"
TARGET_LABEL = "merlin-dp.caraml.dev/target"
SERVICE_NAME_LABEL = "kubernetes.io/service-name"  # set by the EndpointSlice controller

LEASE_NAME = "merlin-dp-controller"
