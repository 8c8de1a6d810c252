"""Locust suite: version endpoints, each called directly.

Every user spreads its requests evenly over ``--versions`` (default: 1), posting to
``/v1/models/<model>-<version>:predict`` with ``Host: <model>-<version>.<project>.<domain>``.
Answers are named by the version that served them (``version v2``), so a version
endpoint answering for another would show; failures are named by cause.

    locust -f merlin_dp/loadtest/locust_version.py --host http://127.0.0.1:8080 \\
        --model demo/iris --versions 1,2 --headless -u 8 -r 8 -t 30s --csv out/versions

or ``merlin-dp loadtest demo/iris --suite version --versions 1,2``.
"""

from __future__ import annotations

import itertools
from typing import Any

from locust import FastHttpUser, constant, events, task

from merlin_dp.loadtest.locust_common import Target, add_suite_arguments, report


def _suite_arguments(parser: Any, **_: Any) -> None:
    add_suite_arguments(parser)


events.init_command_line_parser.add_listener(_suite_arguments)  # type: ignore[no-untyped-call]


class VersionEndpointUser(FastHttpUser):
    """One caller of the version endpoints, closed loop, round robin over the versions."""

    wait_time = constant(0)

    def on_start(self) -> None:
        self.target = Target.from_options(self.environment.parsed_options)
        versions = self.target.versions or ("1",)
        self.requests = itertools.cycle(
            [
                (
                    self.target.version_path(v),
                    {"Host": self.target.version_host(v), "Content-Type": "application/json"},
                )
                for v in versions
            ]
        )
        self.body = self.target.payload

    @task
    def predict(self) -> None:
        path, headers = next(self.requests)
        with self.client.post(
            path, data=self.body, headers=headers, catch_response=True
        ) as response:
            report(response, "version")
