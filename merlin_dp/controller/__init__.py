"""The control plane, and (for now) what runs beside it.

The routing API (`api`, `openapi`, `auth`) over the state (`models`, `state`) and its
stores (`store`, `redis_store`), changes applied by `service.Controller` and published
to gateways (`feed`); the Kubernetes mode (`kubernetes/`); the local runtime
(`runtime/`); the shipped model servers (`servers/`); and the `merlin-dp` command line
(`cli`, `cli_controller`, `client_cli`, `up`). The last three are to get rooms of their
own (issue 16); docs/architecture.md has the map.
"""
