"""`python -m merlin_dp.servers.sklearn`: serve a scikit-learn model with no user code.

The model directory (``CARAML_ARTIFACT_LOCATION``) holds ``model.joblib`` (or
``model.pkl``). Requests use KServe's V1 body, ``{"instances": [[...], ...]}`` (or
``{"inputs": ...}``, which KServe's sklearn server takes too), and get
``{"predictions": [...]}``. V2 / Open Inference Protocol requests come as the same payload
(:mod:`merlin_dp.servers.v2`): one ``[rows, features]`` input tensor, answered with the
``output-0`` tensor. scikit-learn is an optional extra:
``pip install 'merlin-dataplane[sklearn]'``.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

from merlin_dp.servers.contract import BadInput, serve


class SklearnModel:
    def __init__(self, model_dir: str) -> None:
        self.model_dir = Path(model_dir)
        self.model: Any = None

    def load(self) -> None:
        for name in ("model.joblib", "model.pkl", "model.pickle"):
            path = self.model_dir / name
            if path.exists():
                break
        else:
            raise FileNotFoundError(f"no model.joblib or model.pkl in {self.model_dir}")
        if path.suffix == ".joblib":
            import joblib

            self.model = joblib.load(path)
        else:
            with path.open("rb") as f:
                self.model = pickle.load(f)  # the operator's own artifact

    def predict(self, payload: Any) -> dict[str, Any]:
        instances = None
        if isinstance(payload, dict):
            # As KServe's sklearn server reads it: "inputs" first, else "instances".
            instances = payload["inputs"] if "inputs" in payload else payload.get("instances")
        if not isinstance(instances, list) or not instances:
            raise BadInput('expected {"instances": [[feature, ...], ...]}')
        if not all(isinstance(row, list) for row in instances):
            raise BadInput("every instance must be a list of features")
        try:
            predictions = self.model.predict(instances)
        except ValueError as exc:
            raise BadInput(f"the model rejected the instances: {exc}") from None
        return {"predictions": predictions.tolist()}


def main() -> None:
    serve(SklearnModel(os.environ.get("CARAML_ARTIFACT_LOCATION", "")))


if __name__ == "__main__":
    main()
