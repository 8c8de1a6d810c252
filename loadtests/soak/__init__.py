"""Soak and fault injection: ``python -m loadtests.soak``.

Each scenario starts a real stack of its own on 127.0.0.1 — ``merlin-dp controller`` (file
store and local runtime; Redis store in scenario 6; the autoscaler in scenario 4), one
``merlin-dp gateway`` process following it, and replicas the controller's runtime starts
(the soak's own small model server, :mod:`~loadtests.soak.replica`) — runs a steady load
of normal clients through the gateway's stable URL, does one thing to the stack, and
reports requests sent, failed and the failures' causes. One module per scenario:

1. :mod:`~loadtests.soak.weights`: the rule's weights changed every second for a minute;
2. :mod:`~loadtests.soak.blue_green`: switch and rollback, ten times;
3. :mod:`~loadtests.soak.replica_kill`: a serving replica killed with SIGKILL every 10 s;
4. :mod:`~loadtests.soak.scale`: 1 → 4 → 1 replicas by the autoscaler's policy while the
   load ramps up and down;
5. :mod:`~loadtests.soak.controller_restart`: the controller killed (SIGKILL) and started
   again;
6. :mod:`~loadtests.soak.redis_restart`: with the Redis store and the gateway on the Redis
   feed, Redis killed (SIGKILL) and started again;
7. :mod:`~loadtests.soak.hanging_shadow`: a shadow version (100% mirror) whose replica
   never answers;
8. :mod:`~loadtests.soak.abusive_clients`: beside the normal clients, raw-socket abusers:
   slowloris heads, a 1 MB header, a 100 MB body (declared, and chunked), 5,000 idle
   connections and malformed requests — what each got is reported.

What they share: :mod:`~loadtests.soak.stack` (the stack), :mod:`~loadtests.soak.load`
(the normal clients), :mod:`~loadtests.soak.scenario` (bringing a stack up, running the
load and an action, accounting), :mod:`~loadtests.soak.results` (a scenario's result and
the report) and :mod:`~loadtests.soak.cli` (the command line, the full and short sets).
Processes, ports and the systems' argv come from :mod:`loadtests.harness`.

The goal: no failed request from the normal clients, except requests in flight on a
replica killed with SIGKILL, counted apart: every normal request carries its own
``X-Request-Id`` (the gateway passes it on) and the replica appends each id it reads to
a log before anything else, so a failed request whose id a killed replica had logged was
in flight on it. For the instant between the replica's read and its log line, a 502
saying the replica closed the connection before answering (a replica closes, rather
than resets, only a request it has read) for a request under way at a kill and ended
within 2 s of it counts too, and the report says how many were told that way. The
gateway's memory stays bounded: its RSS after warm-up and its peak (``VmHWM`` from
/proc) are reported.

Normal clients are an asyncio/aiohttp pool (closed loop, keep-alive; scenario 8 adds one
caller opening a new connection per request): a harness can start, ramp and stop it
exactly and see every request's id and outcome, which Locust can't give it. The Locust
suites (``merlin_dp/loadtest/``, ``merlin-dp loadtest``) are for running against your
own deployment.

The run prints a Markdown table, then each scenario's details, and ends with
``RESULT soak failed=<n> sent=<n>`` (failed: normal clients' failures not allowed by the
goal). Exit code 0 when that is 0 and every scenario ran. ``--short`` runs the brief
versions ``tests/test_soak.py`` runs (scenarios 1, 2, 3 and 8). ``--only 3,5`` picks
scenarios; ``--workdir DIR`` keeps every log and state directory there (otherwise a
temporary directory, removed after a clean run and kept, and named, otherwise).
Everything is bounded in time, loopback only, and every process started is stopped
(replicas left by a controller are found by the log each writes, killed, and reported).
"""
