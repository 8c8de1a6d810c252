"""Rollouts that move a model endpoint's traffic to a candidate by themselves: the
sequential tests (``analysis``), the evidence they read (``evidence``) and the plan's
state machine (``engine``), all pure; the controller runs them (``controller.rollouts``).
"""
