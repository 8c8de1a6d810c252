"""A UPI v1 model: scores each row by summing its numeric columns.

Serve it by hand, on two free ports (gRPC for predictions, HTTP for the probes)::

    CARAML_GRPC_PORT=9000 CARAML_HTTP_PORT=9001 \\
    CARAML_MODEL_NAME=scorer CARAML_MODEL_VERSION=1 CARAML_MODEL_FULL_NAME=scorer-1 \\
    CARAML_ARTIFACT_LOCATION=examples/upi \\
    python -m merlin_dp.servers.upi row_scorer:RowScorer

and call ``caraml.upi.v1.UniversalPredictionService/PredictValues`` on 127.0.0.1:9000
with a table such as columns ``a`` (DOUBLE), ``b`` (INTEGER), ``city`` (STRING): the
answer is a table with one ``score`` column (DOUBLE), one row per request row, row ids
carried over. A null counts as 0; string columns are ignored. A request table named
``"fail"`` makes the model raise (to see INTERNAL); one named ``"slow"`` takes
``SCORER_SLOW_SECONDS`` (default 2) to answer (to see DEADLINE_EXCEEDED).

Through the controller: ``merlin-dp deploy PROJECT/MODEL/VERSION --type pyfunc --protocol
UPI_V1 --model-dir examples/upi --pyfunc-class row_scorer:RowScorer`` — the local runtime
gives the replica both ports and routes to its gRPC one; route a model endpoint to it
(``merlin-dp route PROJECT/MODEL --weights VERSION=100 --protocol UPI_V1``) and call the
gateway's gRPC port (``merlin-dp up``: 8082) with ``:authority`` set to
``MODEL.PROJECT.localhost``.
"""

from __future__ import annotations

import os
import time

from merlin_dp.servers.contract import BadInput
from merlin_dp.servers.upi import Table


class RowScorer:
    def __init__(self) -> None:
        self.slow_seconds = 2.0

    def load(self) -> None:
        self.slow_seconds = float(os.environ.get("SCORER_SLOW_SECONDS", "2"))

    def predict(self, table: Table) -> Table:
        if table.name == "fail":
            raise RuntimeError("asked to fail")
        if not table.columns:
            raise BadInput("the table has no columns to score")
        if table.name == "slow":
            time.sleep(self.slow_seconds)
        scores: list[list[float | int | str | None]] = []
        for row in table.rows:
            total = 0.0
            for value in row:
                if isinstance(value, int | float):
                    total += value
            scores.append([total])
        return Table(columns=["score"], rows=scores, name="scores")
