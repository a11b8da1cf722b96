"""The HTTP floor: a Flask app whose views do only what any JSON API does (parse the request body,
answer JSON, send 1 KiB), for ``make bench`` to run the full cycle's four requests against under
the service's gunicorn worker settings. What the service's cycles cost beyond it is the service's
own work (authentication, validation, the store, logging, metrics); what it costs is the web stack
on this machine, which no change to the service can go below."""
from __future__ import annotations

from flask import Flask, Response, jsonify, request

app = Flask(__name__)
SOURCE = b"x" * 1024


@app.post("/jobs")
def create() -> tuple[Response, int]:
    return jsonify(job_id="floor", status="pending", echo=len(request.get_json())), 201


@app.get("/poll")
def poll() -> Response:
    return jsonify(job_id="floor", source_file_url="/source", worker_id=request.args["worker_id"])


@app.get("/source")
def source() -> Response:
    return Response(SOURCE, mimetype="application/octet-stream")


@app.put("/result")
def result() -> Response:
    return jsonify(status="completed", echo=len(request.get_json()))
