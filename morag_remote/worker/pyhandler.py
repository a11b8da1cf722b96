"""``python -m morag_remote.worker.pyhandler SPEC INPUT OUTPUT_DIR JOB_ID CONTENT_TYPE``: runs a
``--handler`` callable in a process of its own and writes what it returns as an ``--exec`` command
would (``content.txt``, ``metadata.json``, exit 65 for a non-retryable failure). ``--check SPEC``
only imports it."""
from __future__ import annotations

import importlib
import json
import os
import signal
import sys
import traceback
from typing import Any, Callable

from .handlers import EX_DATAERR
from .job import Job, JobFailed


def load(spec: str) -> Callable[[Job], Any]:
    module_name, _, name = spec.partition(":")
    module = importlib.import_module(module_name)
    target: Any = module
    for part in name.split("."):
        target = getattr(target, part)
    if not callable(target):
        raise TypeError(f"{spec} is not callable")
    return target


def _split(returned: Any) -> tuple[str, dict | None]:
    if isinstance(returned, str):
        return returned, None
    if isinstance(returned, tuple) and len(returned) == 2:
        return returned[0], returned[1]
    if isinstance(returned, dict) and "content" in returned:
        return returned["content"], returned.get("metadata")
    raise TypeError(f"the handler returned {type(returned).__name__}; return a str, (content, metadata) "
                    "or {'content': ..., 'metadata': ...}")


def main(argv: list[str]) -> int:
    if argv[:1] == ["--check"]:
        try:
            load(argv[1])
        except Exception as exc:  # the one line the worker prints at start
            print(f"cannot load it: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 1
        return 0
    spec, input_path, output_dir, job_id, content_type = argv
    job = Job(job_id=job_id, content_type=content_type, path=input_path, output_dir=output_dir,
              options=json.loads(os.environ.get("MORAG_REMOTE_TASK_OPTIONS") or "{}"))
    signal.signal(signal.SIGTERM, lambda *_: job.cancelled.set())
    try:
        content, metadata = _split(load(spec)(job))
        if not isinstance(content, str):
            raise TypeError(f"the content must be a str, not {type(content).__name__}")
        with open(os.path.join(output_dir, "content.txt"), "w", encoding="utf-8") as fh:
            fh.write(content)
        if metadata is not None:
            with open(os.path.join(output_dir, "metadata.json"), "w", encoding="utf-8") as fh:
                json.dump(metadata, fh)
    except JobFailed as exc:
        print(str(exc), file=sys.stderr)
        return 1 if exc.retryable else EX_DATAERR
    except Exception:
        traceback.print_exc()
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
