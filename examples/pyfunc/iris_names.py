"""A pyfunc model: custom Python around an artifact.

Serve it with the pyfunc server (`merlin-dp deploy … --type pyfunc --model-dir DIR
--pyfunc-class iris_names:IrisWithNames`), where DIR holds this file and a model.joblib.
It answers with species names and the probability of each, not bare class numbers.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

SPECIES = ["setosa", "versicolor", "virginica"]


class IrisWithNames:
    def __init__(self) -> None:
        self.model: Any = None

    def load(self) -> None:
        import joblib

        model_dir = Path(os.environ.get("CARAML_ARTIFACT_LOCATION", "."))
        self.model = joblib.load(model_dir / "model.joblib")

    def predict(self, payload: dict[str, Any]) -> dict[str, Any]:
        from merlin_dp.servers.contract import BadInput

        instances = payload.get("instances") if isinstance(payload, dict) else None
        if not isinstance(instances, list) or not all(
            isinstance(row, list) and len(row) == 4 for row in instances
        ):
            raise BadInput("expected {'instances': [[sepal_l, sepal_w, petal_l, petal_w], ...]}")
        probabilities = self.model.predict_proba(instances)
        return {
            "predictions": [
                {"species": SPECIES[int(p.argmax())], "probability": round(float(p.max()), 4)}
                for p in probabilities
            ]
        }
