"""Connecting to the Kubernetes API with the official asyncio client (``kubernetes.aio``).

In a pod the service account is used (``KUBERNETES_SERVICE_HOST`` is set); elsewhere a
kubeconfig; ``--kube-api URL`` talks plain HTTP to a URL with no credentials (``kubectl
proxy``, or the stand-in API server the tests run).
"""

from __future__ import annotations

import os
from pathlib import Path

from kubernetes.aio.client import ApiClient, Configuration
from kubernetes.aio.config import load_incluster_config, load_kube_config

SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


async def api_client(url: str = "", kubeconfig: str = "") -> ApiClient:
    config = Configuration()
    if url:
        config.host = url.rstrip("/")
    elif os.environ.get("KUBERNETES_SERVICE_HOST") and not kubeconfig:
        load_incluster_config(client_configuration=config)  # type: ignore[no-untyped-call]
    else:
        await load_kube_config(  # type: ignore[no-untyped-call]
            config_file=kubeconfig or None, client_configuration=config
        )
    return ApiClient(config)


def default_namespace() -> str:
    """The pod's own namespace in a cluster; ``default`` elsewhere."""
    try:
        return SERVICE_ACCOUNT_NAMESPACE.read_text().strip() or "default"
    except OSError:
        return "default"
