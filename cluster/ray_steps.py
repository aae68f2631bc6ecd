"""Feeding micro-batches to a replica's workers and collecting the results under a deadline.

`submit` encodes every `StepInput` once and sends it to every worker of its replica at once, so
up to P micro-batches are in the pipeline together; Ray runs each actor's calls in submission
order, so every rank sees the micro-batches in the same order and the stages' send and recv
pairs match - also across calls: `submit` returns at once (an `InFlight`), so the pipelined
engine (`scheduler.pipelined`) keeps micro-batches of consecutive steps in flight. The sampling
rank (last stage, TP rank 0) returns the `StepOutput`; the other ranks' results are awaited too
so that an error anywhere surfaces.

Two ways to wait, both a `ray.wait` loop that wakes every `POLL_S`:
- `collect` (steps): replica by replica - a dead actor, a raised exception or a rank still busy
  at the deadline (hung, SIGSTOPped) fails that replica (`on_failure` names it and kills its
  workers at once, so none stays blocked in a gloo recv from the dead one); the other replicas'
  results are still collected;
- `wait_all` (start-up): the first failure, or the deadline, is fatal (`fail` raises).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NoReturn

import ray
from ray.exceptions import RayError

from cluster.ray_failures import describe_failure, gather_peer_errors
from cluster.ray_workers import Worker
from scheduler.wire import StepInput, StepOutput, decode_step_output, encode_step_input

INLINE_LIMIT = 100 * 1024       # bigger step messages go through the object store once, not once per rank
POLL_S = 0.2                    # how often a wait loop looks for failed ranks

Fail = Callable[[list[Worker], str, BaseException | None], NoReturn]


@dataclass
class Failure:
    """A replica that failed a step: the cause names the rank(s), node and pid."""

    replica: int
    cause: str
    detected_at: float                  # time.monotonic()
    exc: BaseException | None


@dataclass
class InFlight:
    """Micro-batches `submit`ted and not yet collected: per step the sampling rank's ref."""

    steps: list[StepInput]
    refs: dict                          # ref -> worker, in submission order
    out_refs: list


def check_ready(steps: list[StepInput], ready: frozenset[int], num_replicas: int) -> None:
    """ValueError naming the first step whose replica may not take steps now."""
    bad = [s.replica for s in steps if s.replica not in ready]
    if bad:
        why = "is being rebuilt" if 0 <= bad[0] < num_replicas else f"is out of range({num_replicas})"
        raise ValueError(f"StepInput.replica={bad[0]} {why}: schedule only executor.ready_replicas "
                         f"({sorted(ready)})")


def submit(steps: list[StepInput], workers_of: Callable[[list[int]], list[Worker]],
           last_stage: int) -> tuple[dict, list]:
    """Send each step to every worker of its replica -> ({ref: worker} in submission order,
    per step the sampling rank's ref)."""
    refs: dict = {}
    out_refs = []
    for step in steps:
        data = encode_step_input(step)
        payload = ray.put(data) if len(data) > INLINE_LIMIT else data
        sampler_ref = None
        for w in workers_of([step.replica]):
            ref = w.actor.execute.remote(payload)
            refs[ref] = w
            if w.rank.pp_rank == last_stage and w.rank.tp_rank == 0:
                sampler_ref = ref
        out_refs.append(sampler_ref)
    return refs, out_refs


def decode(step: StepInput, ref, values: dict, refs: dict, fail: Fail) -> StepOutput:
    if values[ref] is None:
        fail([refs[ref]], f"returned no StepOutput for step {step.step_id}", None)
    return decode_step_output(values[ref])


def collect(refs: dict, values: dict, deadline: float, what: str, timeout_label: str,
            on_failure: Callable[[list[Worker], str, BaseException | None], Failure]) -> dict[int, Failure]:
    """Wait for `refs` (ref -> worker) into `values`, replica by replica; a replica whose rank dies,
    raises or is still busy at the deadline gets a `Failure` from `on_failure`; the other replicas'
    results are still collected."""
    failures: dict[int, Failure] = {}
    pending = list(refs)
    while pending:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            for replica in sorted({refs[r].rank.replica for r in pending}):
                late = [refs[r] for r in pending if refs[r].rank.replica == replica]
                failures[replica] = on_failure(late, f"did not finish {what} before its deadline "
                                                     f"({timeout_label}): hung or stopped", None)
            break
        ready, pending = ray.wait(pending, num_returns=len(pending), timeout=min(remaining, POLL_S))
        try:
            values.update(zip(ready, ray.get(ready), strict=True))   # one call in the common case
            continue
        except RayError:
            pass
        errors = _errors_of(ready, values)
        gather_peer_errors(errors, pending, refs)
        for replica in sorted({refs[r].rank.replica for r in errors}):
            mine = {r: e for r, e in errors.items() if refs[r].rank.replica == replica}
            ref, cause = describe_failure(mine, refs, what)
            failures[replica] = on_failure([refs[ref]], cause, mine[ref])
        pending = [r for r in pending if refs[r].rank.replica not in failures]
    return failures


def wait_all(refs: dict, deadline: float, what: str, timeout_label: str, fail: Fail,
             closed: Callable[[], bool] = lambda: False) -> list:
    """Results of `refs` (ref -> worker) in order; `fail` on the first failure, at the deadline,
    or once `closed()` (the executor shut down under a background rebuild)."""
    values = {}
    pending = list(refs)
    while pending:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or closed():
            late = [refs[r] for r in pending]
            fail(late, "was shut down" if closed() else f"did not finish {what} before its deadline ({timeout_label})",
                 None)
        ready, pending = ray.wait(pending, num_returns=len(pending), timeout=min(remaining, POLL_S))
        try:
            values.update(zip(ready, ray.get(ready), strict=True))   # one call in the common case
        except RayError:
            errors = _errors_of(ready, values)
            # name the root cause (a dead peer rather than the rank whose recv it broke)
            gather_peer_errors(errors, pending, refs)
            ref, cause = describe_failure(errors, refs, what)
            fail([refs[ref]], cause, errors[ref])
    return [values[r] for r in refs]


def _errors_of(ready: list, values: dict) -> dict:
    """Get each ready ref on its own: values into `values`, failures returned (ref -> error)."""
    errors = {}
    for ref in ready:
        try:
            values[ref] = ray.get(ref)
        except RayError as e:
            errors[ref] = e
    return errors
