"""The service layer: the queue's rules (``jobs.py``) and their helpers (long polls, estimates, hooks)."""
from __future__ import annotations

from .estimates import DEFAULT_DURATION, DEFAULT_DURATIONS
from .hooks import JobObserver, TerminalListener
from .jobs import Caller, JobService, ResultOutcome

__all__ = ["Caller", "DEFAULT_DURATION", "DEFAULT_DURATIONS", "JobObserver", "JobService", "ResultOutcome",
           "TerminalListener"]
