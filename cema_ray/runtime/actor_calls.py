"""Calling Ray actors that may be dead, restarting or raising: the driver's side of every actor call.

Faults come in bursts and a restart takes seconds, so a call to an actor is retried with backoff until it
answers (`wait_for_actor`); the project's own errors raised inside an actor are deterministic and end the run
in their own words instead (`project_error`).
"""
from __future__ import annotations

import time
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from cema_ray.errors import CemaError

MAX_RECOVERIES_PER_ROUND = 5
RESTART_TIMEOUT_S = 180.0


def kill_actors(actors: list[Any]) -> None:
    for actor in actors:
        try:
            ray.kill(actor)
        except Exception:  # noqa: BLE001 - already gone
            pass


class HostNeedsRestore(RuntimeError):
    """Raised by a restarted EdgeHost until the driver restores its edges' snapshots."""


class InjectedFault(RuntimeError):
    """An exception raised on purpose by fault injection."""


class OutOfOrderDelivery(RuntimeError):
    """A delivery reached the cloud out of sequence (a restarted cloud resumes at its checkpoint)."""


def raised_inside(exc: BaseException, kind: type[BaseException]) -> bool:
    """An actor call failed because the actor raised ``kind``. Ray wraps what an actor raises in a RayTaskError
    and keeps the original as ``cause``, so the failure is classified by the original's type, never by the words
    of its message."""
    return isinstance(exc, RayTaskError) and isinstance(getattr(exc, "cause", None), kind)


def project_error(exc: BaseException, where: str) -> CemaError | None:
    """The project's own error raised inside an actor, named after the actor, or None.

    A CemaError (a bad checkpoint, an unreadable image) is deterministic: restarting the actor would
    raise it again. Ray wraps it in a RayTaskError and keeps the original as ``cause``; the run ends with
    the original's one-line message instead of restarts and a chained traceback."""
    cause = getattr(exc, "cause", None)
    if not isinstance(exc, RayTaskError) or not isinstance(cause, CemaError):
        return None
    try:
        return type(cause)(f"{where}: {cause}")
    except Exception:  # noqa: BLE001 - a subclass with another signature keeps its own message
        return cause


def backoff_s(attempt: int) -> float:
    """Seconds to wait before retry `attempt` (0, 1, ...): 0.25 doubling to at most 4 s."""
    return min(4.0, 0.25 * 2 ** attempt)


def wait_for_actor(method: Any, *args: Any, where: str = "an actor", on_retry: Any = None) -> Any:
    """Call an actor method until it answers: Ray fails calls while it restarts the actor, and the
    actor may die again meanwhile (each failed attempt calls `on_retry`, backing off between them)."""
    deadline = time.monotonic() + RESTART_TIMEOUT_S
    attempt = 0
    while True:
        try:
            return ray.get(method.remote(*args), timeout=60)
        except (RayActorError, GetTimeoutError):
            if time.monotonic() > deadline:
                raise
            if on_retry is not None:
                on_retry()
            time.sleep(backoff_s(attempt))
            attempt += 1
        except RayTaskError as exc:
            err = project_error(exc, where)
            if err is not None:
                raise err from None
            raise
