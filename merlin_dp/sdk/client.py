"""The SDK's clients: :class:`Client` (blocking, for notebooks and scripts) and
:class:`AsyncClient` (asyncio, for services). Both run the same flows
(:mod:`merlin_dp.sdk.operations`) and offer the same methods, with the same names,
arguments and results; the async ones are awaited.

Names are written as in the CLI: ``"project/model"`` for a model (its endpoint, its
rule, its status) and ``"project/model/version"`` for a version endpoint. The controller
comes from ``controller=`` or ``$MERLIN_DP_CONTROLLER`` (default http://127.0.0.1:8090),
the token from ``token=`` or ``$MERLIN_DP_TOKEN``, and the gateway for predictions from
``gateway=`` or ``$MERLIN_DP_GATEWAY`` (default: found from the model's URL).
"""

from __future__ import annotations

import asyncio
import http.client
import os
import time
from collections.abc import AsyncGenerator, AsyncIterator, Generator, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from merlin_dp.controller.models import (
    AuditEntry,
    EndpointDeleted,
    ModelEndpoint,
    ModelSeries,
    Overview,
    RuleRevision,
    VersionEndpoint,
    VersionLogs,
    WhoAmI,
)
from merlin_dp.sdk.errors import Unreachable, api_error
from merlin_dp.sdk.operations import (
    Call,
    Flow,
    ModelStatus,
    Operations,
    Pause,
    Prediction,
    Reply,
    RouteChange,
    build,
    deploy_body,
    mirror_change,
    route_change,
    sticky_change,
    weights_change,
    weights_rule,
)
from merlin_dp.spec.endpoints import AutoscalingPolicy, ResourceRequest, VersionEndpointSpec
from merlin_dp.spec.rollout import RolloutPlan, RolloutStatus
from merlin_dp.spec.rule import Destination, HeaderMatch, Mirror, Protocol, Rule, Sticky

T = TypeVar("T")

DEFAULT_CONTROLLER = "http://127.0.0.1:8090"
DEFAULT_WAIT = 300.0
Weights = Mapping[str, int] | Sequence[Destination]


class _Options:
    """Where the API and the gateway are, and the token: arguments, else environment."""

    def __init__(self, controller: str | None, token: str | None, gateway: str | None) -> None:
        self.ops = Operations(
            controller or os.environ.get("MERLIN_DP_CONTROLLER") or DEFAULT_CONTROLLER,
            token if token is not None else os.environ.get("MERLIN_DP_TOKEN"),
            gateway or os.environ.get("MERLIN_DP_GATEWAY"),
        )

    @property
    def controller(self) -> str:
        return self.ops.controller


def _rollout_plan(
    candidate: str, plan: RolloutPlan | dict[str, Any] | None, options: dict[str, Any]
) -> RolloutPlan:
    data = (
        plan.model_dump(exclude_unset=True) if isinstance(plan, RolloutPlan) else dict(plan or {})
    )
    data.update({k: v for k, v in options.items() if v is not None}, candidate=candidate)
    return build(RolloutPlan, data, "plan")


class Client(_Options):
    """The controller's API and the gateway, from blocking code.

    >>> client = Client()
    >>> client.deploy("demo/iris/1", model=IrisModel())      # doctest: +SKIP
    >>> client.route("demo/iris", {"1": 100})                  # doctest: +SKIP
    >>> client.predict("demo/iris", {"instances": [[5.1, 3.5, 1.4, 0.2]]}).result  # doctest: +SKIP
    """

    def __init__(
        self, controller: str | None = None, token: str | None = None, gateway: str | None = None
    ) -> None:
        super().__init__(controller, token, gateway)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Nothing held between calls; here for symmetry with AsyncClient."""

    def __repr__(self) -> str:
        return f"Client(controller={self.controller!r})"

    # --- running flows ------------------------------------------------------------------

    def _run(self, flow: Flow[T]) -> T:
        reply: Reply | None = None
        try:
            while True:
                step = flow.send(reply)
                if isinstance(step, Pause):
                    time.sleep(step.seconds)
                    reply = None
                else:
                    reply = _send(step)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]

    def _lines(self, call: Call) -> Iterator[bytes]:
        conn, resp = _open(call)
        try:
            if resp.status >= 400:
                raise api_error(resp.status, Reply(resp.status, {}, resp.read()).json())
            while True:
                line = resp.readline()
                if not line:
                    return
                yield line
        finally:
            conn.close()

    # --- version endpoints ------------------------------------------------------------

    def deploy(
        self,
        name: str,
        model: Any = None,
        *,
        model_dir: str | Path | None = None,
        pyfunc_class: str | None = None,
        command: Sequence[str] | None = None,
        workdir: str | Path | None = None,
        artifacts: Mapping[str, str | Path] | None = None,
        requirements: Sequence[str] = (),
        package_dir: str | Path | None = None,
        protocol: Protocol = "HTTP_JSON",
        resources: ResourceRequest | dict[str, Any] | None = None,
        autoscaling: AutoscalingPolicy | dict[str, Any] | None = None,
        env: Mapping[str, str] | None = None,
        container_concurrency: int | None = None,
        ready_deadline: float | None = None,
        spec: VersionEndpointSpec | dict[str, Any] | None = None,
        wait: float | None = DEFAULT_WAIT,
        if_match: int | None = None,
    ) -> VersionEndpoint:
        """Deploy (or redeploy) version endpoint ``name`` ("project/model/version") and,
        unless ``wait`` is 0 or None, wait up to ``wait`` seconds until it runs.

        What runs is one of: ``model``, an object or class with Merlin's
        ``initialize``/``infer`` or ``load``/``predict``, or a fitted scikit-learn
        estimator, packaged into ``package_dir`` (with ``artifacts`` and
        ``requirements``); ``model_dir=`` (with ``pyfunc_class="module:Class"``, or a
        scikit-learn ``model.joblib``); ``command=[...]`` (run in ``workdir``, default
        here); or a whole ``spec``. A version that fails raises DeployFailed with the
        reason and its last log lines."""
        body = deploy_body(
            model, model_dir=model_dir, pyfunc_class=pyfunc_class, command=command,
            workdir=workdir, artifacts=artifacts, requirements=requirements,
            package_dir=package_dir, protocol=protocol, resources=resources,
            autoscaling=autoscaling, env=env, container_concurrency=container_concurrency,
            ready_deadline=ready_deadline, spec=spec,
        )  # fmt: skip
        return self._run(self.ops.deploy(name, body, wait=wait, if_match=if_match))

    def wait(self, name: str, timeout: float = DEFAULT_WAIT) -> VersionEndpoint:
        """Until version endpoint ``name`` runs (DeployFailed, WaitTimeout)."""
        return self._run(self.ops.wait(name, timeout))

    def version(self, name: str) -> VersionEndpoint:
        return self._run(self.ops.get_version(name))

    def versions(self, model: str) -> list[VersionEndpoint]:
        """The model's version endpoints, terminated ones included, by version."""
        return self._run(self.ops.versions(model))

    def undeploy(self, name: str, *, if_match: int | None = None) -> VersionEndpoint:
        return self._run(self.ops.undeploy(name, if_match))

    def logs(self, name: str, lines: int = 50) -> VersionLogs:
        """The last ``lines`` of each replica's log (local runtime)."""
        return self._run(self.ops.logs(name, lines))

    def follow_logs(self, name: str, lines: int = 10) -> Generator[str, None, None]:
        """The last lines, then each line as it is written, until the iterator is closed."""
        for line in self._lines(self.ops.follow_logs(name, lines)):
            yield line.decode("utf-8", "replace").rstrip("\n")

    # --- model endpoints --------------------------------------------------------------

    def endpoint(self, model: str) -> ModelEndpoint:
        return self._run(self.ops.endpoint(model))

    def route(
        self,
        model: str,
        weights: Weights | None = None,
        *,
        rule: Rule | dict[str, Any] | None = None,
        match: Sequence[HeaderMatch | dict[str, Any]] = (),
        sticky: Sticky | dict[str, Any] | None = None,
        mirror: Mirror | dict[str, Any] | None = None,
        timeout: float | None = None,
        protocol: Protocol | None = None,
        if_match: int | None = None,
    ) -> ModelEndpoint:
        """Set the model endpoint's whole rule: ``weights`` ({"1": 90, "2": 10}) with
        ``match``, ``sticky``, ``mirror`` and ``timeout``, or ``rule=``. Creates the
        endpoint the first time. ``if_match``: the revision you read, or StaleRevision."""
        body = _rule(weights, rule, match, sticky, mirror, timeout)
        return self._run(self.ops.set_rule(model, body, protocol, if_match))

    def set_weights(self, model: str, weights: Weights) -> ModelEndpoint:
        """Change only the split, keeping matches, stickiness and the mirror. Read and
        written back with If-Match: a change made in between raises StaleRevision."""
        return self._run(self.ops.edit_rule(model, **weights_change(weights)))

    def set_mirror(
        self, model: str, version: str | None, percent: float = 100.0, **options: Any
    ) -> ModelEndpoint:
        """Shadow ``percent`` of requests to ``version`` (None stops mirroring)."""
        return self._run(self.ops.edit_rule(model, **mirror_change(version, percent, options)))

    def set_match(self, model: str, match: Sequence[HeaderMatch | dict[str, Any]]) -> ModelEndpoint:
        """Replace the header matches (evaluated in order, before weights)."""
        return self._run(self.ops.edit_rule(model, match=list(match)))

    def set_sticky(
        self, model: str, *, header: str | None = None, cookie: str | None = None
    ) -> ModelEndpoint:
        """Pin callers by a header's or a cookie's value; neither: stop pinning."""
        return self._run(self.ops.edit_rule(model, **sticky_change(header, cookie)))

    def switch(
        self, model: str, to: str | None = None, *, if_match: int | None = None
    ) -> ModelEndpoint:
        """Blue-green: all traffic to ``to`` (default: the one other running version)."""
        return self._run(self.ops.switch(model, to, if_match))

    def rollback(
        self, model: str, to_revision: int | None = None, *, if_match: int | None = None
    ) -> ModelEndpoint:
        """Back to the previous rule, or to revision ``to_revision``."""
        return self._run(self.ops.rollback(model, to_revision, if_match))

    def history(self, model: str) -> list[RuleRevision]:
        """The endpoint's last 100 rules, oldest first."""
        return self._run(self.ops.history(model))

    def delete_endpoint(self, model: str, *, if_match: int | None = None) -> EndpointDeleted:
        return self._run(self.ops.delete_endpoint(model, if_match))

    def status(self, model: str) -> ModelStatus:
        """Endpoint, versions and rollout in one; ``print()`` it for a table."""
        return self._run(self.ops.status(model))

    def whoami(self) -> WhoAmI:
        """Who the token says you are: name, access, projects."""
        return self._run(self.ops.whoami())

    def overview(self) -> Overview:
        """Every model you may read, each version's last seconds (req/s, errors, latency,
        shadow agreement, replicas): what the console's first page shows."""
        return self._run(self.ops.overview())

    def series(self, model: str, since: int = -1) -> ModelSeries:
        """The model's last 15 minutes per version and second (after ``since``), with the
        autoscaler's scale events."""
        return self._run(self.ops.series(model, since))

    def watch_series(self, model: str, since: int = -1) -> Generator[ModelSeries, None, None]:
        """The series, then each new second as it closes, until the generator is closed."""
        for line in self._lines(self.ops.watch_series(model, since)):
            if line.strip():
                yield ModelSeries.model_validate_json(line)

    def audit(self, limit: int = 100) -> list[AuditEntry]:
        return self._run(self.ops.audit(limit))

    def watch(self, model: str) -> Generator[RouteChange, None, None]:
        """Each change to the model's traffic as gateways see it (rule, versions, ready
        replicas), starting with how it is now; runs until the iterator is closed."""
        last: RouteChange | None = None
        for line in self._lines(self.ops.watch()):
            change = route_change(line, model, last)
            if change is not None:
                last = change
                yield change

    # --- rollouts ---------------------------------------------------------------------

    def start_rollout(
        self,
        model: str,
        candidate: str,
        plan: RolloutPlan | dict[str, Any] | None = None,
        *,
        steps: Sequence[int] | None = None,
        step_seconds: float | None = None,
        shadow: bool | None = None,
        if_match: int | None = None,
    ) -> RolloutStatus:
        """Roll ``candidate`` out: shadow, canary ``steps``, then the switch, judged on
        the gateways' signals (docs/rollouts.md)."""
        options = {"steps": steps, "step_seconds": step_seconds, "shadow": shadow}
        return self._run(self.ops.start_rollout(
            model, _rollout_plan(candidate, plan, options), if_match))  # fmt: skip

    def rollout(self, model: str) -> RolloutStatus:
        return self._run(self.ops.rollout(model))

    def pause_rollout(self, model: str) -> RolloutStatus:
        return self._run(self.ops.steer_rollout(model, "pause"))

    def resume_rollout(self, model: str) -> RolloutStatus:
        return self._run(self.ops.steer_rollout(model, "resume"))

    def abort_rollout(self, model: str) -> RolloutStatus:
        return self._run(self.ops.steer_rollout(model, "abort"))

    # --- predictions ------------------------------------------------------------------

    def predict(
        self,
        model: str,
        payload: Any,
        *,
        version: str | None = None,
        headers: Mapping[str, str] | None = None,
        path: str = "/v1/predict",
        timeout: float | None = 60.0,
    ) -> Prediction:
        """POST ``payload`` (JSON) to the model's stable URL (or one ``version``'s)."""
        return self._run(self.ops.predict(model, payload, version=version, path=path,
                                          headers=headers, timeout=timeout))  # fmt: skip


def _rule(
    weights: Weights | None,
    rule: Rule | dict[str, Any] | None,
    match: Sequence[HeaderMatch | dict[str, Any]],
    sticky: Sticky | dict[str, Any] | None,
    mirror: Mirror | dict[str, Any] | None,
    timeout: float | None,
) -> Rule:
    if rule is not None:
        if weights is not None or match or sticky or mirror or timeout is not None:
            raise ValueError("give rule= alone, or weights with match/sticky/mirror/timeout")
        return build(Rule, rule, "rule")
    if weights is None:
        raise ValueError('give the weights, e.g. {"1": 90, "2": 10}, or rule=')
    return weights_rule(weights, match=match, sticky=sticky, mirror=mirror, timeout=timeout)


# --- blocking HTTP ---------------------------------------------------------------------


def _open(call: Call) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    url = urlsplit(call.url)
    conn_class = (
        http.client.HTTPSConnection if url.scheme == "https" else http.client.HTTPConnection
    )
    conn = conn_class(url.hostname or "127.0.0.1", url.port, timeout=call.timeout)
    target = url.path + (f"?{url.query}" if url.query else "")
    try:
        conn.request(call.method, target, body=call.body, headers=dict(call.headers))
        return conn, conn.getresponse()
    except (OSError, http.client.HTTPException) as exc:
        conn.close()
        where = f"{url.scheme}://{url.netloc}"
        raise Unreachable(f"cannot reach {where}: {exc}") from None


def _send(call: Call) -> Reply:
    conn, resp = _open(call)
    try:
        body = resp.read()
    except (OSError, http.client.HTTPException) as exc:
        raise Unreachable(f"lost {call.url} while reading its answer: {exc}") from None
    finally:
        conn.close()
    return Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, body)


# --- the asyncio client ------------------------------------------------------------------


class AsyncClient(_Options):
    """:class:`Client`'s methods, awaited; use ``async with AsyncClient() as client``
    (or call :meth:`close`) so its connections are released."""

    def __init__(
        self, controller: str | None = None, token: str | None = None, gateway: str | None = None
    ) -> None:
        super().__init__(controller, token, gateway)
        self._session: Any = None

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def __repr__(self) -> str:
        return f"AsyncClient(controller={self.controller!r})"

    def _client(self) -> Any:
        import aiohttp

        if self._session is None:
            self._session = aiohttp.ClientSession(
                auto_decompress=False, connector=aiohttp.TCPConnector(force_close=True)
            )
        return self._session

    async def _run(self, flow: Flow[T]) -> T:
        reply: Reply | None = None
        try:
            while True:
                step = flow.send(reply)
                if isinstance(step, Pause):
                    await asyncio.sleep(step.seconds)
                    reply = None
                else:
                    reply = await self._send(step)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]

    async def _send(self, call: Call) -> Reply:
        import aiohttp

        timeout = aiohttp.ClientTimeout(total=call.timeout)
        try:
            async with self._client().request(
                call.method, call.url, data=call.body, headers=dict(call.headers), timeout=timeout
            ) as resp:
                body = await resp.read()
                headers = {k.lower(): v for k, v in resp.headers.items()}
                return Reply(resp.status, headers, body)
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise Unreachable(f"cannot reach {call.url}: {exc or type(exc).__name__}") from None

    async def _lines(self, call: Call) -> AsyncIterator[bytes]:
        import aiohttp

        timeout = aiohttp.ClientTimeout(total=None, sock_read=None)
        try:
            async with self._client().request(
                call.method, call.url, headers=dict(call.headers), timeout=timeout
            ) as resp:
                if resp.status >= 400:
                    raise api_error(resp.status, Reply(resp.status, {}, await resp.read()).json())
                while line := await resp.content.readline():
                    yield line
        except (aiohttp.ClientError, OSError) as exc:
            raise Unreachable(f"cannot reach {call.url}: {exc}") from None

    # The same methods as Client's, in the same order; each docstring is Client's.

    async def deploy(
        self,
        name: str,
        model: Any = None,
        *,
        model_dir: str | Path | None = None,
        pyfunc_class: str | None = None,
        command: Sequence[str] | None = None,
        workdir: str | Path | None = None,
        artifacts: Mapping[str, str | Path] | None = None,
        requirements: Sequence[str] = (),
        package_dir: str | Path | None = None,
        protocol: Protocol = "HTTP_JSON",
        resources: ResourceRequest | dict[str, Any] | None = None,
        autoscaling: AutoscalingPolicy | dict[str, Any] | None = None,
        env: Mapping[str, str] | None = None,
        container_concurrency: int | None = None,
        ready_deadline: float | None = None,
        spec: VersionEndpointSpec | dict[str, Any] | None = None,
        wait: float | None = DEFAULT_WAIT,
        if_match: int | None = None,
    ) -> VersionEndpoint:
        body = deploy_body(
            model, model_dir=model_dir, pyfunc_class=pyfunc_class, command=command,
            workdir=workdir, artifacts=artifacts, requirements=requirements,
            package_dir=package_dir, protocol=protocol, resources=resources,
            autoscaling=autoscaling, env=env, container_concurrency=container_concurrency,
            ready_deadline=ready_deadline, spec=spec,
        )  # fmt: skip
        return await self._run(self.ops.deploy(name, body, wait=wait, if_match=if_match))

    async def wait(self, name: str, timeout: float = DEFAULT_WAIT) -> VersionEndpoint:
        return await self._run(self.ops.wait(name, timeout))

    async def version(self, name: str) -> VersionEndpoint:
        return await self._run(self.ops.get_version(name))

    async def versions(self, model: str) -> list[VersionEndpoint]:
        return await self._run(self.ops.versions(model))

    async def undeploy(self, name: str, *, if_match: int | None = None) -> VersionEndpoint:
        return await self._run(self.ops.undeploy(name, if_match))

    async def logs(self, name: str, lines: int = 50) -> VersionLogs:
        return await self._run(self.ops.logs(name, lines))

    async def follow_logs(self, name: str, lines: int = 10) -> AsyncGenerator[str, None]:
        async for line in self._lines(self.ops.follow_logs(name, lines)):
            yield line.decode("utf-8", "replace").rstrip("\n")

    async def endpoint(self, model: str) -> ModelEndpoint:
        return await self._run(self.ops.endpoint(model))

    async def route(
        self,
        model: str,
        weights: Weights | None = None,
        *,
        rule: Rule | dict[str, Any] | None = None,
        match: Sequence[HeaderMatch | dict[str, Any]] = (),
        sticky: Sticky | dict[str, Any] | None = None,
        mirror: Mirror | dict[str, Any] | None = None,
        timeout: float | None = None,
        protocol: Protocol | None = None,
        if_match: int | None = None,
    ) -> ModelEndpoint:
        body = _rule(weights, rule, match, sticky, mirror, timeout)
        return await self._run(self.ops.set_rule(model, body, protocol, if_match))

    async def set_weights(self, model: str, weights: Weights) -> ModelEndpoint:
        return await self._run(self.ops.edit_rule(model, **weights_change(weights)))

    async def set_mirror(
        self, model: str, version: str | None, percent: float = 100.0, **options: Any
    ) -> ModelEndpoint:
        return await self._run(
            self.ops.edit_rule(model, **mirror_change(version, percent, options))
        )

    async def set_match(
        self, model: str, match: Sequence[HeaderMatch | dict[str, Any]]
    ) -> ModelEndpoint:
        return await self._run(self.ops.edit_rule(model, match=list(match)))

    async def set_sticky(
        self, model: str, *, header: str | None = None, cookie: str | None = None
    ) -> ModelEndpoint:
        return await self._run(self.ops.edit_rule(model, **sticky_change(header, cookie)))

    async def switch(
        self, model: str, to: str | None = None, *, if_match: int | None = None
    ) -> ModelEndpoint:
        return await self._run(self.ops.switch(model, to, if_match))

    async def rollback(
        self, model: str, to_revision: int | None = None, *, if_match: int | None = None
    ) -> ModelEndpoint:
        return await self._run(self.ops.rollback(model, to_revision, if_match))

    async def history(self, model: str) -> list[RuleRevision]:
        return await self._run(self.ops.history(model))

    async def delete_endpoint(self, model: str, *, if_match: int | None = None) -> EndpointDeleted:
        return await self._run(self.ops.delete_endpoint(model, if_match))

    async def status(self, model: str) -> ModelStatus:
        return await self._run(self.ops.status(model))

    async def whoami(self) -> WhoAmI:
        return await self._run(self.ops.whoami())

    async def overview(self) -> Overview:
        return await self._run(self.ops.overview())

    async def series(self, model: str, since: int = -1) -> ModelSeries:
        return await self._run(self.ops.series(model, since))

    async def watch_series(self, model: str, since: int = -1) -> AsyncGenerator[ModelSeries, None]:
        async for line in self._lines(self.ops.watch_series(model, since)):
            if line.strip():
                yield ModelSeries.model_validate_json(line)

    async def audit(self, limit: int = 100) -> list[AuditEntry]:
        return await self._run(self.ops.audit(limit))

    async def watch(self, model: str) -> AsyncGenerator[RouteChange, None]:
        last: RouteChange | None = None
        async for line in self._lines(self.ops.watch()):
            change = route_change(line, model, last)
            if change is not None:
                last = change
                yield change

    async def start_rollout(
        self,
        model: str,
        candidate: str,
        plan: RolloutPlan | dict[str, Any] | None = None,
        *,
        steps: Sequence[int] | None = None,
        step_seconds: float | None = None,
        shadow: bool | None = None,
        if_match: int | None = None,
    ) -> RolloutStatus:
        options = {"steps": steps, "step_seconds": step_seconds, "shadow": shadow}
        return await self._run(self.ops.start_rollout(
            model, _rollout_plan(candidate, plan, options), if_match))  # fmt: skip

    async def rollout(self, model: str) -> RolloutStatus:
        return await self._run(self.ops.rollout(model))

    async def pause_rollout(self, model: str) -> RolloutStatus:
        return await self._run(self.ops.steer_rollout(model, "pause"))

    async def resume_rollout(self, model: str) -> RolloutStatus:
        return await self._run(self.ops.steer_rollout(model, "resume"))

    async def abort_rollout(self, model: str) -> RolloutStatus:
        return await self._run(self.ops.steer_rollout(model, "abort"))

    async def predict(
        self,
        model: str,
        payload: Any,
        *,
        version: str | None = None,
        headers: Mapping[str, str] | None = None,
        path: str = "/v1/predict",
        timeout: float | None = 60.0,
    ) -> Prediction:
        return await self._run(self.ops.predict(model, payload, version=version, path=path,
                                                headers=headers, timeout=timeout))  # fmt: skip
