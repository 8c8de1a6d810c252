"""Rollouts: the plan that moves a model endpoint's traffic to a candidate version by
itself, and the progress a controller keeps of it.

:class:`RolloutPlan` is the body of ``POST .../endpoint:rollout`` and the ``rollout`` of
a ``ModelEndpoint``'s spec in Kubernetes; :class:`Analysis` holds its sequential tests'
parameters. :class:`RolloutStatus` is what the controller persists with its state and
what ``GET .../endpoint/rollout`` answers: phase, step, the evidence gathered
(:class:`Evidence`, counts only, so it survives a restart) and every decision with the
numbers it was made on. The tests themselves are :mod:`merlin_dp.rollout.analysis`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field, HttpUrl, field_validator, model_validator

from merlin_dp.spec.rule import Rule, StrictModel, VersionId


class Analysis(StrictModel):
    """The sequential tests that judge a candidate against the baseline (Wald's SPRT per
    metric; docs/rollouts.md says why and what each number means)."""

    alpha: float = Field(
        default=0.0005, gt=0, le=0.1,
        description="Per test: the chance that a candidate as good as the baseline is "
        "rolled back by it (a false alarm).",
    )  # fmt: skip
    beta: float = Field(
        default=0.005, gt=0, le=0.2,
        description="Per test: the chance that a candidate exactly at the margin passes.",
    )  # fmt: skip
    error_rate_margin: float = Field(
        default=0.005, gt=0, le=0.5,
        description="The smallest rise in the share of server errors worth a rollback: "
        "the candidate is judged against the baseline's error rate plus this (or times "
        "error_rate_ratio, whichever is more).",
    )  # fmt: skip
    error_rate_ratio: float = Field(default=1.5, ge=1.0, le=100)
    latency_slowdown: float = Field(
        default=1.25, gt=1.0, le=10,
        description="The smallest slowdown worth a rollback, as a factor on the "
        "baseline's latency (1.25: a quarter slower).",
    )  # fmt: skip
    compare_predictions: bool = Field(
        default=True,
        description="While shadowing, judge how often the candidate's answers differ from "
        "the baseline's (status, or body beyond the tolerance). false: errors and latency "
        "only (a retrained model is meant to answer differently).",
    )
    mismatch_rate_allowed: float = Field(
        default=0.001, gt=0, lt=0.5,
        description="The share of compared answers that may differ and still pass.",
    )  # fmt: skip
    mismatch_rate_margin: float = Field(
        default=0.01, gt=0, le=0.5,
        description="Differing answers this much above the allowed share fail.",
    )  # fmt: skip
    min_samples: int = Field(
        default=50, ge=1, le=1_000_000,
        description="No test decides on fewer answers from either version.",
    )  # fmt: skip
    settle_seconds: float = Field(
        default=2.0, ge=0, le=300,
        description="Seconds after each routing change that are not counted (gateways "
        "take the new table within about a second).",
    )  # fmt: skip


class RolloutPlan(StrictModel):
    """How to roll a candidate out (the body of ``POST .../endpoint:rollout``)."""

    candidate: VersionId = Field(description="The version to roll out; it must be running.")
    shadow: bool = Field(
        default=True,
        description="First mirror all traffic to the candidate and compare its answers "
        "(no caller sees them) until the analysis passes or fails it.",
    )
    steps: list[int] = Field(
        default_factory=lambda: [1, 5, 25, 50],
        max_length=20,
        description="Canary weights in percent, rising, each 1-99; then the blue-green "
        "switch to 100.",
    )
    step_seconds: float = Field(
        default=30.0, ge=1, le=86400,
        description="The least time each canary step is held; longer while a test is more "
        "than halfway to failing without deciding.",
    )  # fmt: skip
    relative_tolerance: float = Field(
        default=1e-6, ge=0, le=1,
        description="While shadowing: numbers in JSON answers that agree within this agree.",
    )  # fmt: skip
    webhook: HttpUrl | None = Field(
        default=None,
        description="POSTed before each canary step and before promotion; an answer other "
        "than 2xx (or none within 10 s) pauses the rollout.",
    )
    analysis: Analysis = Field(default_factory=Analysis)

    @field_validator("steps")
    @classmethod
    def _rising(cls, steps: list[int]) -> list[int]:
        for i, weight in enumerate(steps):
            if not 1 <= weight <= 99:
                raise ValueError(f"steps.{i}: {weight} is not a canary weight (1-99)")
            if i and weight <= steps[i - 1]:
                raise ValueError(f"steps.{i}: {weight} does not rise above {steps[i - 1]}")
        return steps

    @model_validator(mode="after")
    def _judged(self) -> RolloutPlan:
        if not self.shadow and not self.steps:
            raise ValueError("a rollout with no shadow and no steps would judge nothing")
        return self


class Progress(StrictModel):
    """Mutable: the controller updates progress in place on its own copy."""

    model_config = ConfigDict(extra="forbid", frozen=False, allow_inf_nan=False)


class Tally(Progress):
    """One version's answers over the counted seconds of an analysis."""

    answered: int = 0
    errors: int = Field(default=0, description="Server errors: 5xx, or a gRPC server fault.")
    latency: list[int] = Field(
        default_factory=list,
        description="Answers per latency bucket (spec.signals.LATENCY_BUCKETS, then +Inf).",
    )


class Evidence(Progress):
    """What one analysis (the shadow's, or the live steps') has counted so far."""

    baseline: Tally = Field(default_factory=Tally)
    candidate: Tally = Field(default_factory=Tally)
    compared: int = Field(default=0, description="Shadow: answer pairs compared.")
    differed: int = Field(
        default=0,
        description="Shadow: pairs that differed, beyond a server error on either side.",
    )
    latency_bound: float | None = Field(
        default=None,
        description="The latency (s) the latency test counts answers above; chosen from "
        "the baseline's answers once it has enough, then kept.",
    )
    passed: list[str] = Field(default_factory=list, description="Tests that passed.")


Verdict = Literal["pass", "fail", "pending"]


class Judgement(StrictModel):
    """One sequential test as it stood."""

    metric: Literal["error_rate", "latency", "mismatch_rate"]
    baseline: float = Field(description="The baseline's value (a share of answers).")
    candidate: float = Field(description="The candidate's value.")
    margin: float = Field(description="The candidate's value the test weighs against.")
    samples: int = Field(description="Candidate answers counted.")
    llr: float = Field(description="Log-likelihood ratio, regression over no regression.")
    fail_at: float
    pass_at: float
    verdict: Verdict


Phase = Literal["shadow", "canary", "promoted", "rolled_back", "aborted"]
Action = Literal["start", "step", "promote", "rollback", "pause", "resume", "abort"]


class RolloutDecision(StrictModel):
    at: float
    action: Action
    weight: int = Field(description="The candidate's share of traffic after it.")
    reason: str
    tests: list[Judgement] = Field(default_factory=list)
    revision: int = Field(default=0, description="The route revision that carried it out.")


class RolloutStatus(Progress):
    """A model endpoint's rollout as the controller keeps it."""

    project: str
    model: str
    baseline: VersionId
    candidate: VersionId
    plan: RolloutPlan
    phase: Phase = "shadow"
    step: int = Field(default=-1, description="Index into plan.steps; -1 while shadowing.")
    weight: int = Field(default=0, description="The candidate's share of callers, percent.")
    paused: bool = False
    message: str = ""
    started: float = 0.0
    step_started: float = 0.0
    count_from: int = Field(
        default=0, description="The first wall-clock second the current phase counts."
    )
    counted_to: int = Field(default=0, description="The last second counted so far.")
    shadow: Evidence = Field(default_factory=Evidence)
    live: Evidence = Field(default_factory=Evidence)
    tests: list[Judgement] = Field(default_factory=list, description="As they stand now.")
    rule_before: Rule = Field(description="The rule a rollback returns to.")
    decisions: list[RolloutDecision] = Field(default_factory=list)
    finished: float | None = None

    @property
    def active(self) -> bool:
        return self.phase in ("shadow", "canary")
