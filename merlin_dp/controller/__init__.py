"""The control plane: the routing API and the state behind it.

The API (``api``, ``openapi``, ``auth``, served by ``http_server``) over the state
(``models``, ``state``) and its stores (``store``, ``redis_store``, with ``statedir``
guarding a file store's directory); changes are applied by ``service.Controller`` and
published to gateways (``feed``); ``urls`` names the stable URLs; ``autoscaling`` joins an
autoscaler to the controller; ``server`` runs it all. Kubernetes mode is ``kubernetes/``.
Runtimes, model servers and the command line are rooms of their own
(:mod:`merlin_dp.runtime`, :mod:`merlin_dp.servers`, :mod:`merlin_dp.cli`).
"""
