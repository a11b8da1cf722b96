"""The remote job record, its statuses and the one table of legal transitions.

Every change of a job's status goes through :func:`next_status`, so the table below is the whole
state machine: a (status, action) pair that is not in it is an :class:`InvalidTransition`.
"""
from __future__ import annotations

import copy
import dataclasses
import enum
import functools
import os
import re
import threading
import time
import uuid
from datetime import datetime, timezone
from typing import Any, Callable, Iterable

from .exceptions import InvalidTransition

Clock = Callable[[], datetime]


def utcnow() -> datetime:
    """The default clock: timezone-aware UTC."""
    return datetime.now(timezone.utc)


_id_lock = threading.Lock()
_id_last: list[int] = [0, 0]  # the (milliseconds, counter) of the last id this process made


def new_job_id() -> str:
    """A UUIDv7 id (RFC 9562): 48 bits of milliseconds, then a 12-bit counter, then random bits.

    String order is creation order within a process, even for ids made in the same millisecond:
    the counter (seeded randomly in each new millisecond, with room to count up) orders them, and
    when it runs out the id borrows the next millisecond (RFC 9562 section 6.2, method 1). The
    list cursor relies on this order.
    """
    with _id_lock:
        ms = time.time_ns() // 1_000_000
        last_ms, counter = _id_last
        if ms > last_ms:
            counter = int.from_bytes(os.urandom(2), "big") & 0x7FF
        else:  # same millisecond, or the clock stepped back: keep counting from the last id
            ms, counter = last_ms, counter + 1
            if counter > 0xFFF:
                ms, counter = last_ms + 1, int.from_bytes(os.urandom(2), "big") & 0x7FF
        _id_last[:] = [ms, counter]
    rand = int.from_bytes(os.urandom(8), "big") & ((1 << 62) - 1)
    value = (ms << 80) | (0x7 << 76) | (counter << 64) | (0b10 << 62) | rand
    return str(uuid.UUID(int=value))


_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


def valid_job_id(job_id: str) -> bool:
    """The id rule of every backend: a plain ASCII token of 1-64 characters (ids name files, so no
    '/', '..', NUL, and no non-ASCII letters or digits, whose UTF-8 bytes can make a name too long
    for a file system; PostgreSQL refuses the same ids, so an export moves between backends)."""
    return _ID.fullmatch(job_id) is not None


class Status(str, enum.Enum):
    PENDING = "pending"
    PROCESSING = "processing"
    COMPLETED = "completed"
    FAILED = "failed"
    TIMEOUT = "timeout"
    CANCELLED = "cancelled"
    HELD = "held"  # a lease lapsed on a job whose on_lapse is hold: no worker claims it

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL

    @property
    def is_announced(self) -> bool:
        """Whether entering this status sends an event to the ingestion side: every terminal
        status, and ``held`` (someone must decide: ``retry`` or ``cancel``)."""
        return self in ANNOUNCED


TERMINAL = frozenset({Status.COMPLETED, Status.FAILED, Status.TIMEOUT, Status.CANCELLED})
ANNOUNCED = TERMINAL | {Status.HELD}
STATUSES = tuple(s.value for s in Status)


class Action(str, enum.Enum):
    CLAIM = "claim"              # a worker's poll takes a pending job
    HEARTBEAT = "heartbeat"      # the lease holder says it is alive
    COMPLETE = "complete"        # success result
    FAIL_RETRY = "fail_retry"    # failure result, retries remain: back to the queue with backoff
    FAIL = "fail"                # failure result, no retry left (or retryable: false)
    LAPSE_RETRY = "lapse_retry"  # lease ran out, retries remain
    LAPSE = "lapse"              # lease ran out, no retry left
    EXPIRE = "expire"            # pending longer than the optional pending TTL, or past its expires_at
    CANCEL = "cancel"            # producer gives up on the job
    RETRY = "retry"              # producer/admin re-opens a finished job
    RELEASE = "release"          # the lease holder hands the job back unfinished (e.g. it shuts down)
    LAPSE_HOLD = "lapse_hold"    # lease ran out on a job whose on_lapse is hold: kept for an operator


TRANSITIONS: dict[tuple[Status, Action], Status] = {
    (Status.PENDING, Action.CLAIM): Status.PROCESSING,
    (Status.PENDING, Action.EXPIRE): Status.TIMEOUT,
    (Status.PENDING, Action.CANCEL): Status.CANCELLED,
    (Status.PROCESSING, Action.HEARTBEAT): Status.PROCESSING,
    (Status.PROCESSING, Action.COMPLETE): Status.COMPLETED,
    (Status.PROCESSING, Action.FAIL_RETRY): Status.PENDING,
    (Status.PROCESSING, Action.FAIL): Status.FAILED,
    (Status.PROCESSING, Action.LAPSE_RETRY): Status.PENDING,
    (Status.PROCESSING, Action.LAPSE): Status.TIMEOUT,
    (Status.PROCESSING, Action.CANCEL): Status.CANCELLED,
    (Status.PROCESSING, Action.RELEASE): Status.PENDING,
    (Status.FAILED, Action.RETRY): Status.PENDING,
    (Status.TIMEOUT, Action.RETRY): Status.PENDING,
    (Status.CANCELLED, Action.RETRY): Status.PENDING,
    (Status.PROCESSING, Action.LAPSE_HOLD): Status.HELD,
    (Status.HELD, Action.RETRY): Status.PENDING,
    (Status.HELD, Action.CANCEL): Status.CANCELLED,
}


def next_status(current: Status | str, action: Action) -> Status:
    """The status ``action`` leads to from ``current``; raises InvalidTransition when illegal."""
    status = Status(current)
    try:
        return TRANSITIONS[(status, action)]
    except KeyError:
        raise InvalidTransition(
            f"cannot {action.value.replace('_', ' ')} a job that is {status.value}",
            job_status=status.value,
            action=action.value,
        ) from None


_TIME_FIELDS = ("created_at", "started_at", "completed_at", "timeout_at", "available_at",
                "updated_at", "heartbeat_at", "expires_at")


def to_iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    return value.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


def from_iso(value: str | None) -> datetime | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"expected an ISO 8601 timestamp, got {type(value).__name__}")
    parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    if parsed.tzinfo is None:  # records written by other tools: naive means UTC
        parsed = parsed.replace(tzinfo=timezone.utc)
    return parsed


# What each stored field must hold. A record that breaks this is unreadable, not a job: a stray type
# (a string priority, a number for a timestamp) would otherwise break sorting and arithmetic for
# every job a process indexes, not just this one.
_STR_FIELDS = ("id", "ingestion_task_id", "source_file_path", "content_type", "status")
_OPTIONAL_STR_FIELDS = ("worker_id", "error_message", "lease_id", "progress_message", "result_digest",
                        "on_lapse")
_INT_FIELDS = ("retry_count", "max_retries", "priority", "attempt", "version", "releases")
_DICT_FIELDS = ("task_options", "extra")


def times_to_iso(data: dict[str, Any], names: Iterable[str]) -> dict[str, Any]:
    """``data`` with the named datetime values as ISO 8601 strings (in place), for a JSON record."""
    for name in names:
        data[name] = to_iso(data[name])
    return data


@functools.lru_cache(maxsize=None)
def field_names(cls: type) -> frozenset[str]:
    """The field names of dataclass ``cls`` (``dataclasses.fields`` builds its answer on every call,
    and records are read and written several times per request)."""
    return frozenset(f.name for f in dataclasses.fields(cls))


def record_values(cls: type, data: dict[str, Any], names: Iterable[str],
                  check: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """The constructor arguments of dataclass ``cls`` in a stored record: unknown keys dropped,
    ``check`` run on the raw values, the named times parsed (ValueError naming the field)."""
    known = field_names(cls)
    values = {k: v for k, v in data.items() if k in known}
    if check is not None:
        check(values)
    for name in names:
        if name in values:
            try:
                values[name] = from_iso(values[name])
            except ValueError as exc:
                raise ValueError(f"field {name!r}: {exc}") from None
    return values


def _check_types(values: dict[str, Any]) -> None:
    """ValueError naming the first field whose stored value has the wrong type."""
    def bad(name: str, expected: str) -> ValueError:
        return ValueError(f"field {name!r} must be {expected}, got {type(values[name]).__name__}")

    for name in _STR_FIELDS:
        if name in values and not isinstance(values[name], str):
            raise bad(name, "a string")
    for name in _OPTIONAL_STR_FIELDS:
        if values.get(name) is not None and not isinstance(values[name], str):
            raise bad(name, "a string or null")
    for name in _INT_FIELDS:
        if name in values and (not isinstance(values[name], int) or isinstance(values[name], bool)):
            raise bad(name, "an integer")
    for name in _DICT_FIELDS:
        if name in values and not isinstance(values[name], dict):
            raise bad(name, "an object")
    if values.get("result_data") is not None and not isinstance(values["result_data"], dict):
        raise bad("result_data", "an object or null")
    if values.get("requires") is not None and not isinstance(values["requires"], dict):
        raise bad("requires", "an object or null")
    progress = values.get("progress")
    if progress is not None and (not isinstance(progress, (int, float)) or isinstance(progress, bool)):
        raise bad("progress", "a number or null")


@dataclasses.dataclass
class RemoteJob:
    """One conversion job. Field names up to ``timeout_at`` are the seed's; the rest serve the lifecycle."""

    id: str
    ingestion_task_id: str
    source_file_path: str
    content_type: str
    task_options: dict[str, Any]
    status: str = Status.PENDING.value
    worker_id: str | None = None
    created_at: datetime | None = None
    started_at: datetime | None = None
    completed_at: datetime | None = None
    error_message: str | None = None
    result_data: dict[str, Any] | None = None
    retry_count: int = 0
    max_retries: int = 3
    timeout_at: datetime | None = None
    priority: int = 0
    available_at: datetime | None = None
    attempt: int = 0
    lease_id: str | None = None
    progress: float | None = None
    progress_message: str | None = None
    heartbeat_at: datetime | None = None
    updated_at: datetime | None = None
    version: int = 0
    result_digest: str | None = None
    releases: int = 0  # times a holder handed the job back (``release``): not failed attempts
    # files: where the source came from and what it holds (size, sha256, and the inode, size and
    # mtime the sha256 was taken at), and the artifacts of the successful attempt (name, size,
    # sha256, file inside the blob store, attempt)
    source_upload_id: str | None = None
    source_name: str | None = None
    source_size: int | None = None
    source_sha256: str | None = None
    source_stat: dict[str, Any] | None = None
    artifacts: list[dict[str, Any]] | None = None
    # routing (routing.py): what the worker must offer, when a pending job expires, what a lapse does
    requires: dict[str, Any] | None = None
    expires_at: datetime | None = None
    on_lapse: str | None = None  # None: the content type's ON_LAPSE
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The record as JSON-ready values. Shallow: nested dicts are the job's own (encode them, do
        not change them); ``dataclasses.asdict`` deep-copied every value and cost more than the rest
        of a store write."""
        return times_to_iso({name: getattr(self, name) for name in _JOB_FIELDS}, _TIME_FIELDS)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RemoteJob":
        values = record_values(cls, data, _TIME_FIELDS, check=_check_types)
        Status(values.get("status", Status.PENDING.value))  # reject unknown statuses early
        return cls(**values)

    def copy(self) -> "RemoteJob":
        """An independent copy (nested dicts and lists copied too), for a mutator to change.

        The fields are copied as they are (``__init__`` only assigns them, and there is no
        ``__post_init__``); ``dataclasses.replace`` and ``copy.deepcopy`` cost several times more.
        """
        clone = object.__new__(type(self))
        values = clone.__dict__
        for name in _JOB_FIELDS:
            values[name] = _copy_value(getattr(self, name))
        return clone

    @property
    def status_enum(self) -> Status:
        return Status(self.status)

    @property
    def sort_key(self) -> tuple:
        """Claim order: higher priority first, then oldest (ids are time-ordered)."""
        return (-self.priority, self.created_at, self.id)


_JOB_FIELDS = tuple(f.name for f in dataclasses.fields(RemoteJob))  # in declaration order
_IMMUTABLE = (str, int, float, type(None), datetime)


def _copy_value(value: Any) -> Any:
    """A deep copy of a record value: JSON-shaped values (dicts, lists, scalars) copied directly,
    anything else by ``copy.deepcopy``."""
    if isinstance(value, _IMMUTABLE):  # bool is an int
        return value
    if isinstance(value, dict):
        return {key: _copy_value(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_copy_value(item) for item in value]
    return copy.deepcopy(value)
