"""Who the service tells about committed transitions: observers (metrics) and terminal listeners
(completion events). Every hook a listener may be called with is declared in its protocol."""
from __future__ import annotations

from typing import Protocol

import structlog

from ..models import Action, RemoteJob, Status

log = structlog.get_logger(__name__)


class TerminalListener(Protocol):
    """Told about terminal states: when a job reaches one, leaves one, or is asked about again."""

    def job_finished(self, job: RemoteJob) -> bool:
        """Called once per terminal transition; True when the ingestion side accepted it now."""

    def job_leaving_terminal(self, job: RemoteJob) -> None:
        """Called before a terminal job is re-opened (inside the store's critical section) or
        deleted: a chance to record what the state meant first."""

    def job_accepted(self, job: RemoteJob) -> bool:
        """Whether the ingestion side has accepted the job's terminal state (asked when a worker
        sends the same result again)."""


class JobObserver(Protocol):
    def job_changed(self, action: Action, job: RemoteJob) -> None:
        """Told after each committed transition, with the job as stored (metrics count these)."""


class Hooks:
    """The service's listeners and observers. A committed change is never failed by one of them:
    a failing observer or listener is logged, and the others are still told."""

    def __init__(self) -> None:
        self.listeners: list[TerminalListener] = []
        self.observers: list[JobObserver] = []

    def changed(self, action: Action, job: RemoteJob) -> None:
        for observer in self.observers:
            try:
                observer.job_changed(action, job)
            except Exception:
                log.exception("job.observer_failed", observer=type(observer).__name__, action=action.value,
                              job_id=job.id)

    def finished(self, job: RemoteJob) -> bool:
        """Tell the listeners a job reached a terminal state (or ``held``, which is announced the
        same way); True when one says it was accepted."""
        if not Status(job.status).is_announced:
            return False
        accepted = False
        for listener in self.listeners:
            try:
                accepted = listener.job_finished(job) or accepted
            except Exception:
                log.exception("job.listener_failed", listener=type(listener).__name__, job_id=job.id)
        return accepted

    def accepted(self, job: RemoteJob) -> bool:
        """For a repeated result: whether the ingestion side has accepted the job's terminal state
        by now (the first answer said whether it did during that request; a retried request whose
        first answer was lost learns the same, or better: a later delivery counts)."""
        if not Status(job.status).is_terminal:
            return False
        try:
            return any(listener.job_accepted(job) for listener in self.listeners)
        except Exception:  # the outbox cannot be read now: the repeat is still answered
            log.exception("job.listener_failed", job_id=job.id)
            return False

    def leaving_terminal(self, job: RemoteJob) -> None:
        """Before a job leaves a terminal (or held) state or is deleted. Not guarded: a listener
        that cannot record what the state meant must stop the change (it runs before the write)."""
        if not Status(job.status).is_announced:
            return
        for listener in self.listeners:
            listener.job_leaving_terminal(job)
