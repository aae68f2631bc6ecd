"""Naming the rank that broke a wait: which failure is the root cause, and how to say it.

A rank whose peer died usually raises first (gloo: connection reset), so the same replica's
other calls get a moment to report the death, and the dead rank is blamed rather than its victim.
"""

from __future__ import annotations

import ray
from ray.exceptions import RayActorError, RayError, RayTaskError

DEATH_GRACE_S = 1.0             # after a rank raises, how long to look for a dead peer to blame instead
MAX_CAUSE_CHARS = 300           # of a remote exception's text in EngineDeadError


def gather_peer_errors(errors: dict, pending: list, refs: dict) -> None:
    """If nobody died yet, give the failed replicas' pending calls DEATH_GRACE_S to fail too (into `errors`)."""
    if any(isinstance(e, RayActorError) for e in errors.values()):
        return
    replicas = {refs[r].rank.replica for r in errors}
    peers = [r for r in pending if refs[r].rank.replica in replicas]
    ready, _ = ray.wait(peers, num_returns=len(peers), timeout=DEATH_GRACE_S) if peers else ([], [])
    for ref in ready:
        try:
            ray.get(ref)
        except RayError as e:
            errors[ref] = e


def describe_failure(errors: dict, refs: dict, what: str):
    """-> (the ref to blame, a one-line cause). A dead actor beats a raised exception."""
    ref, exc = next(((r, e) for r, e in errors.items() if isinstance(e, RayActorError)),
                    next(iter(errors.items())))
    if isinstance(exc, RayActorError):
        cause = f"died during {what}: {first_line(exc)}"
    elif isinstance(exc, RayTaskError):
        cause = f"raised during {what}: {task_cause(exc)}"
    else:
        cause = f"failed during {what}: {first_line(exc)}"
    others = {refs[r].rank.describe() for r in errors} - {refs[ref].rank.describe()}
    if others:
        cause += f" (then {', '.join(sorted(others))} failed too)"
    return ref, cause


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:MAX_CAUSE_CHARS] if text else type(e).__name__


def task_cause(e: RayTaskError) -> str:
    cause = getattr(e, "cause", None)
    if cause is not None and not isinstance(cause, RayTaskError):
        return f"{type(cause).__name__}: {str(cause)[:MAX_CAUSE_CHARS]}"
    return first_line(e)
