"""``morag-remote-worker`` / ``python -m morag_remote.worker``: settings, checks at start, then the
worker loop. A setting or a check that fails is one line on stderr and exit 2, before any job is
claimed."""
from __future__ import annotations

import json
import sys

from ..client.errors import ConfigError
from . import logs
from .config import load
from .handlers import build_handler
from .runner import EX_CONFIG, Worker
from .state import StateDir


def main(argv: list[str] | None = None) -> int:
    try:
        config, print_only = load(argv)
        if print_only:
            print(json.dumps(config.shown(), indent=2, sort_keys=True))
            return 0
        handler = build_handler(config.exec, config.handler)
        handler.check()
    except ConfigError as exc:
        print(f"morag-remote-worker: {exc}", file=sys.stderr)
        return EX_CONFIG
    logs.configure(config.log_level)
    state = StateDir(config.state_dir)
    try:
        state.open()
        worker = Worker(config, handler, state)
        worker.preflight()
    except ConfigError as exc:
        print(f"morag-remote-worker: {exc}", file=sys.stderr)
        state.close()
        return EX_CONFIG
    try:
        return worker.run()
    finally:
        state.close()


if __name__ == "__main__":
    sys.exit(main())
