"""The worker's settings: command-line flags, then ``MORAG_REMOTE_WORKER_*`` environment variables,
then an optional TOML file (``--config`` or ``MORAG_REMOTE_WORKER_CONFIG``), then the defaults; the
first that sets a value wins (the key and the handler as pairs: ``--key-file`` beats the
environment's ``KEY``, ``--handler`` a file's ``exec``). ``--print-config`` shows the result with
the key masked.

Each setting has one name everywhere: ``--content-types`` is ``MORAG_REMOTE_WORKER_CONTENT_TYPES``
and ``content_types`` in the file.
"""
from __future__ import annotations

import argparse
import os
import secrets
import socket
import tomllib
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping

from ..client.errors import ConfigError
from ..client.http import parse_base_url

ENV_PREFIX = "MORAG_REMOTE_WORKER_"


def default_state_dir() -> str:
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "morag-remote-worker")


def default_worker_id() -> str:
    """``<hostname>-<6 hex>``: stable for the process, unique across hosts and restarts."""
    return f"{socket.gethostname().split('.')[0] or 'worker'}-{secrets.token_hex(3)}"


@dataclass
class WorkerConfig:
    url: str
    key: str = field(repr=False)
    content_types: list[str]
    worker_id: str
    exec: str | None = None
    handler: str | None = None
    concurrency: int = 1
    state_dir: str = ""
    grace: float = 30.0
    kill_grace: float = 10.0
    max_runtime: dict[str, float] = field(default_factory=dict)
    poll_wait: float = 20.0
    timeout: float = 30.0
    max_output: int = 32 * 1024 * 1024
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    log_level: str = "info"
    labels: dict[str, str] = field(default_factory=dict)
    # what this worker offers to jobs' ``requires`` (routing): labels it has, resources and amounts
    capability_labels: list[str] = field(default_factory=list)
    resources: dict[str, float] = field(default_factory=dict)

    def capabilities(self) -> dict[str, Any] | None:
        """The poll's ``capabilities``; None when the worker offers nothing (it then takes only
        jobs that require nothing, as before routing existed)."""
        if not self.capability_labels and not self.resources:
            return None
        return {"labels": list(self.capability_labels), "resources": dict(self.resources)}

    def runtime_limit(self, content_type: str) -> float | None:
        return self.max_runtime.get(content_type, self.max_runtime.get("default"))

    def shown(self) -> dict[str, Any]:
        """The settings for ``--print-config``, the key masked (only its length shows)."""
        out = asdict(self)
        out["key"] = f"*** ({len(self.key)} characters)" if self.key else None
        return out


# name -> (parser of a text value, default); a None default is "required" or "unset"
def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError("must be at least 1")
    return value


def _seconds(text: str) -> float:
    value = float(text)
    if not value >= 0 or value == float("inf"):
        raise ValueError("must be a number of seconds, 0 or more")
    return value


def _positive_seconds(text: str) -> float:
    value = _seconds(text)
    if value <= 0:
        raise ValueError("must be a number of seconds above 0")
    return value


def _types(value: Any) -> list[str]:
    items = value if isinstance(value, list) else str(value).split(",")
    out = [str(v).strip() for v in items if str(v).strip()]
    if not out:
        raise ValueError("name at least one content type")
    return list(dict.fromkeys(out))


def _names(value: Any) -> list[str]:
    items = value if isinstance(value, list) else str(value).split(",")
    return list(dict.fromkeys(str(v).strip() for v in items if str(v).strip()))


def _resources(value: Any) -> dict[str, float]:
    """``gpu_memory_gb=24,cpus=8`` (or a list of such, or a TOML table) as names and finite numbers."""
    pairs = value.items() if isinstance(value, Mapping) else [
        part.strip().partition("=")[::2] for item in (value if isinstance(value, list) else [value])
        for part in str(item).split(",") if part.strip()]
    out: dict[str, float] = {}
    for name, text in pairs:
        name = str(name).strip()
        amount = float(str(text).strip())  # ValueError for a bare name or a word
        if not name or amount != amount or amount in (float("inf"), float("-inf")):
            raise ValueError("give NAME=NUMBER, a finite number")
        out[name] = amount
    return out


def _pairs(value: Any, convert: Callable[[str], Any]) -> dict[str, Any]:
    """``a=1,b=2`` (or a list of such, or a TOML table) as a dict; a bare number is ``default``."""
    if isinstance(value, Mapping):
        return {str(k): convert(str(v)) for k, v in value.items()}
    items = value if isinstance(value, list) else [value]
    out: dict[str, Any] = {}
    for item in items:
        for part in str(item).split(","):
            part = part.strip()
            if not part:
                continue
            name, sep, text = part.partition("=")
            if not sep:
                name, text = "default", part
            out[name.strip()] = convert(text.strip())
    return out


PARSERS: dict[str, Callable[[Any], Any]] = {
    "url": str, "key": str, "key_file": str, "content_types": _types, "worker_id": str, "exec": str,
    "handler": str, "concurrency": lambda v: _positive_int(str(v)), "state_dir": str,
    "grace": lambda v: _seconds(str(v)), "kill_grace": lambda v: _seconds(str(v)),
    "max_runtime": lambda v: _pairs(v, _seconds), "poll_wait": lambda v: _seconds(str(v)),
    "timeout": lambda v: _positive_seconds(str(v)), "max_output": lambda v: _positive_int(str(v)),
    "metrics_port": lambda v: _positive_int(str(v)), "metrics_host": str, "log_level": str,
    "labels": lambda v: _pairs(v, str),
    "capability_labels": _names, "resources": _resources,
}


PAIRS = (("key", "key_file"), ("exec", "handler"))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="morag-remote-worker",
        description="Poll a morag-remote server for jobs and run a handler for each one. Every flag can "
                    f"also be set as {ENV_PREFIX}<NAME> or in the --config TOML file (flags win, then "
                    "the environment, then the file).")
    s = argparse.SUPPRESS
    p.add_argument("--config", default=s, help="a TOML file of settings (same names, with underscores)")
    p.add_argument("--url", default=s, help="the server's base URL, e.g. https://queue.example:8000")
    p.add_argument("--key", default=s, help="a worker API key (prefer --key-file or the environment)")
    p.add_argument("--key-file", default=s, help="a file holding the worker API key")
    p.add_argument("--content-types", default=s, help="comma-separated content types to take, e.g. audio,video")
    p.add_argument("--worker-id", default=s, help="default: <hostname>-<random>")
    handler = p.add_mutually_exclusive_group()
    handler.add_argument("--exec", default=s, dest="exec",
                         help="command template: {input} {output_dir} {job_id} {content_type}")
    handler.add_argument("--handler", default=s, help="a Python callable, package.module:function")
    p.add_argument("--concurrency", default=s, help="jobs run at once (default 1)")
    p.add_argument("--state-dir", default=s,
                   help="undelivered results and per-job working folders (default ~/.local/state/morag-remote-worker)")
    p.add_argument("--grace", default=s, help="seconds running jobs may finish after SIGTERM (default 30)")
    p.add_argument("--kill-grace", default=s, help="seconds between a handler's SIGTERM and SIGKILL (default 10)")
    p.add_argument("--max-runtime", default=s, action="append",
                   help="TYPE=SECONDS (repeatable or comma-separated; a bare number for every type)")
    p.add_argument("--poll-wait", default=s, help="long-poll seconds (default 20, at most the server's maximum)")
    p.add_argument("--timeout", default=s, help="seconds to wait for an answer to one request (default 30)")
    p.add_argument("--max-output", default=s, help="largest content and captured stdout in bytes (default 32 MiB)")
    p.add_argument("--metrics-port", default=s, help="serve Prometheus metrics on this port")
    p.add_argument("--metrics-host", default=s, help="address for --metrics-port (default 127.0.0.1)")
    p.add_argument("--labels", default=s, action="append", help="NAME=VALUE announced to the server")
    p.add_argument("--capability-labels", default=s,
                   help="comma-separated labels this worker offers to jobs that require them, e.g. gpu,cuda12")
    p.add_argument("--resources", default=s, action="append",
                   help="NAME=NUMBER this worker offers to jobs' minimums, e.g. gpu_memory_gb=24")
    p.add_argument("--log-level", default=s, help="debug, info, warning or error (default info)")
    p.add_argument("--print-config", action="store_true", help="print the settings (key masked) and exit")
    return p


def _from_file(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"cannot read the config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"the config file {path} is not valid TOML: {exc}") from None
    unknown = sorted(set(data) - set(PARSERS))
    if unknown:
        raise ConfigError(f"the config file {path} has unknown settings: {', '.join(unknown)}")
    return data


def load(argv: list[str] | None = None, environ: Mapping[str, str] | None = None) -> tuple[WorkerConfig, bool]:
    """The settings from ``argv`` and ``environ`` (default: the process's), and whether only
    ``--print-config`` was asked. ConfigError names the first bad setting."""
    environ = os.environ if environ is None else environ
    args = vars(build_parser().parse_args(argv))
    print_only = args.pop("print_config")
    config_path = args.pop("config", None) or environ.get(f"{ENV_PREFIX}CONFIG")
    layers: list[tuple[str, dict[str, Any]]] = [("flag", args)]
    layers.append(("environment", {name: environ[ENV_PREFIX + name.upper()] for name in PARSERS
                                   if environ.get(ENV_PREFIX + name.upper())}))
    if config_path:
        layers.append((f"config file {config_path}", _from_file(config_path)))
    # settings that come in pairs (a key or its file, one handler or the other) are taken whole
    # from the first layer that sets either: --key-file beats the environment's KEY, --handler a
    # file's exec
    for pair in PAIRS:
        first = next((layer for _, layer in layers if any(n in layer for n in pair)), None)
        for _, layer in layers:
            if layer is not first:
                for n in pair:
                    layer.pop(n, None)
    values: dict[str, Any] = {}
    for name, parse in PARSERS.items():
        for where, layer in layers:
            if name in layer:
                try:
                    values[name] = parse(layer[name])
                except (TypeError, ValueError) as exc:
                    label = f"--{name.replace('_', '-')}" if where == "flag" else (
                        ENV_PREFIX + name.upper() if where == "environment" else f"{name} in the {where}")
                    raise ConfigError(f"{label}: {exc}") from None
                break
    return _validated(values), print_only


def _validated(values: dict[str, Any]) -> WorkerConfig:
    for name, flag in (("url", "--url"), ("content_types", "--content-types")):
        if not values.get(name):
            raise ConfigError(f"{flag} is required (or {ENV_PREFIX}{name.upper()})")
    parse_base_url(values["url"])
    key_file = values.pop("key_file", None)
    if not values.get("key") and key_file:
        try:
            with open(key_file) as fh:
                values["key"] = fh.read().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read the key file {key_file}: {exc.strerror}") from None
    if not values.get("key"):
        raise ConfigError(f"a key is required: --key-file, --key or {ENV_PREFIX}KEY")
    if bool(values.get("exec")) == bool(values.get("handler")):
        raise ConfigError("give exactly one of --exec (a command template) and --handler (module:function)")
    values.setdefault("worker_id", default_worker_id())
    values.setdefault("state_dir", default_state_dir())
    values["state_dir"] = os.path.abspath(os.path.expanduser(values["state_dir"]))
    if values.get("log_level", "info").lower() not in ("debug", "info", "warning", "error"):
        raise ConfigError("--log-level must be debug, info, warning or error")
    return WorkerConfig(**values)
