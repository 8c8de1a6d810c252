"""The example version endpoint's replica (deploy/examples/version-endpoints.yaml).

A stand-in model under Merlin's replica contract, built on the shipped contract app
(:func:`merlin_dp.servers.contract.make_app`: predict, readiness, liveness, /metrics).
It scores each instance by the sum of its features times the version number, so two
versions answer differently. Unlike the shipped model servers, which bind 127.0.0.1 for
the local runtime, it listens on every interface, as a pod must for probes and gateways.
"""

from __future__ import annotations

import os
from typing import Any

from aiohttp import web

from merlin_dp.servers.contract import BadInput, make_app


class SumModel:
    def __init__(self, factor: float) -> None:
        self.factor = factor

    def load(self) -> None:
        pass

    def predict(self, payload: Any) -> Any:
        try:
            rows = payload["instances"]
            return {"predictions": [round(sum(map(float, r)) * self.factor, 4) for r in rows]}
        except (KeyError, TypeError, ValueError) as exc:
            raise BadInput(f'expected {{"instances": [[numbers]]}}: {exc}') from None


def main() -> None:
    port = int(os.environ["CARAML_HTTP_PORT"])
    full_name = os.environ["CARAML_MODEL_FULL_NAME"]
    factor = float(os.environ.get("CARAML_MODEL_VERSION", "1"))
    app = make_app(SumModel(factor), full_name)
    web.run_app(app, host="0.0.0.0", port=port, print=None, access_log=None)


if __name__ == "__main__":
    main()
