"""The HTTP API: one blueprint module per resource, each view documenting itself (see openapi.py)."""
from __future__ import annotations

from flask import Flask


def register_blueprints(app: Flask) -> None:
    from . import docs, health, metrics, remote_jobs, stats, types, uploads, workers

    app.register_blueprint(health.bp)
    app.register_blueprint(metrics.bp)
    app.register_blueprint(docs.bp)
    app.register_blueprint(stats.bp)  # before remote_jobs: /stats and /workers must not match /<job_id>
    app.register_blueprint(workers.bp)
    app.register_blueprint(uploads.bp)  # before remote_jobs, like stats
    app.register_blueprint(types.bp)
    app.register_blueprint(remote_jobs.bp)
