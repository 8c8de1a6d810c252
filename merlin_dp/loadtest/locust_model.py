"""Locust suite: a model's stable URL (HTTP_JSON), the way its callers use it.

Every user posts the payload to ``http://<gateway>/v1/predict`` with ``Host:
<model>.<project>.<domain>`` back to back; each answer is named by the version that
served it (``predict v1``, ``predict v2``), so Locust's table shows the split callers
saw, and each failure by its cause (``HTTP 503 unavailable``, ``connection …``).

    locust -f merlin_dp/loadtest/locust_model.py --host http://127.0.0.1:8080 --model demo/iris \\
        --headless -u 16 -r 16 -t 30s --csv out/model

or ``merlin-dp loadtest demo/iris`` (runs this headless and prints a summary).
"""

from __future__ import annotations

from typing import Any

from locust import FastHttpUser, constant, events, task

from merlin_dp.loadtest.locust_common import Target, add_suite_arguments, report


def _suite_arguments(parser: Any, **_: Any) -> None:
    add_suite_arguments(parser)


events.init_command_line_parser.add_listener(_suite_arguments)  # type: ignore[no-untyped-call]


class ModelEndpointUser(FastHttpUser):
    """One caller of the stable URL, closed loop (no think time)."""

    wait_time = constant(0)

    def on_start(self) -> None:
        self.target = Target.from_options(self.environment.parsed_options)
        self.headers = {"Host": self.target.model_host, "Content-Type": "application/json"}
        self.body = self.target.payload

    @task
    def predict(self) -> None:
        with self.client.post(
            "/v1/predict", data=self.body, headers=self.headers, catch_response=True
        ) as response:
            report(response, "predict")
