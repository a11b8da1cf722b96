"""What a Python handler (``--handler package.module:function``) is given and may raise.

A handler is called with one :class:`Job` and returns the content (a ``str``), a ``(content,
metadata)`` pair, or a dict with ``content`` and optionally ``metadata``; raising
:class:`JobFailed` with ``retryable=False`` says the input cannot be converted, any other exception
is a failure worth retrying. ``job.cancelled`` is set when the worker stops the job (the lease was
lost, it was cancelled, the worker shuts down): return soon, the process is killed after the grace.
"""
from __future__ import annotations

import sys
import threading
from dataclasses import dataclass, field
from typing import Any


class JobFailed(Exception):
    def __init__(self, message: str, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable


@dataclass
class Job:
    job_id: str
    content_type: str
    path: str                      # the downloaded source file
    output_dir: str                # a folder of the job's own for anything the handler writes
    options: dict[str, Any]        # the job's task_options
    cancelled: threading.Event = field(default_factory=threading.Event)

    def progress(self, fraction: float, message: str | None = None) -> None:
        """Report progress (0..1); the next heartbeat carries it to the server."""
        line = f"progress {min(max(float(fraction), 0.0), 1.0):.4f}"
        if message:
            line += " " + " ".join(str(message).split())
        sys.__stdout__.write(line + "\n")
        sys.__stdout__.flush()
