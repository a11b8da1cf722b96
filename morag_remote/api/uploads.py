"""``/api/v1/remote-jobs/uploads/``: tus 1.0 resumable uploads (core, creation, checksum,
expiration, termination) for producers on other hosts; the rules are in ``uploads.py``.

A finished upload's id (or its URL) is what ``POST /api/v1/remote-jobs/`` takes as
``source_upload_id``. Every answer carries ``Tus-Resumable``; the tus headers of each operation are
documented in the OpenAPI document, and the JSON view of an upload is ``GET /uploads/<id>``.
"""
from __future__ import annotations

from email.utils import format_datetime

from flask import Blueprint, Response, g, request, url_for

from .. import schemas
from ..auth import current_principal, requires
from ..context import uploads
from ..exceptions import OffsetMismatch, TusVersionUnsupported
from ..request_body import body_reader
from ..store.base import UploadState
from ..uploads import CHECKSUMS, EXTENSIONS, TUS_VERSION, encode_metadata
from .http import documented, hidden, respond

bp = Blueprint("uploads", __name__, url_prefix="/api/v1/remote-jobs/uploads")
UPLOADS = "uploads"

_INT = {"type": "integer", "minimum": 0}
_TUS = {"Tus-Resumable": {"description": "`1.0.0`", "required": True,
                          "schema": {"type": "string", "enum": [TUS_VERSION]}}}
_EXPIRES = {"Upload-Expires": {"description": "When an unfinished upload is deleted (RFC 9110 date); "
                                              "absent once it is complete.",
                               "required": False, "schema": {"type": "string"}}}
_OFFSET = {"Upload-Offset": {"description": "Bytes stored so far.", "required": True, "schema": _INT}}
_LENGTH = {"Upload-Length": {"description": "The upload's whole length.", "required": True, "schema": _INT}}


@bp.after_request
def _tus_headers(response: Response) -> Response:
    response.headers["Tus-Resumable"] = TUS_VERSION
    offset = g.get("upload_offset")
    if offset is not None and "Upload-Offset" not in response.headers:
        response.headers["Upload-Offset"] = str(offset)
    return response


@bp.before_request
def _tus_version() -> None:
    asked = request.headers.get("Tus-Resumable")
    if request.method != "OPTIONS" and asked is not None and asked != TUS_VERSION:
        raise TusVersionUnsupported(f"this server speaks tus {TUS_VERSION}, not {asked!r}",
                                    tus_version=TUS_VERSION)


def _state_headers(response: Response, state: UploadState) -> Response:
    response.headers["Upload-Offset"] = str(state.offset)
    response.headers["Upload-Length"] = str(state.length)
    if not state.complete:
        response.headers["Upload-Expires"] = format_datetime(state.expires_at, usegmt=True)
    if state.metadata:
        response.headers["Upload-Metadata"] = encode_metadata(state.metadata)
    response.cache_control.no_store = True
    return response


@bp.route("", methods=["OPTIONS"])
@bp.route("/", methods=["OPTIONS"])
@hidden("tus discovery: what the server supports, in tus headers, without a key")
def options() -> Response:
    response = Response(status=204)
    response.headers["Tus-Version"] = TUS_VERSION
    response.headers["Tus-Extension"] = EXTENSIONS
    response.headers["Tus-Max-Size"] = str(uploads().settings.max_bytes)
    response.headers["Tus-Checksum-Algorithm"] = ",".join(CHECKSUMS)
    return response


@bp.post("")
@bp.post("/")
@documented(
    "Create an upload (tus creation)", tag=UPLOADS, success=201,
    headers=("Upload-Length", "Upload-Metadata", "Tus-Resumable"), errors=(400, 412, 413, 507),
    success_headers={**_TUS, **_EXPIRES,
                     "Location": {"description": "The upload's URL.", "required": True, "schema": {"type": "string"}}},
    description="`Upload-Length` is the file's size (at most `MAX_UPLOAD_BYTES`); `Upload-Metadata` may "
                "carry `filename` (the download name of a job made from it) and `sha256` (hex: the "
                "finished file is checked against it). Then `PATCH` the bytes to `Location`.")
@requires("producer")
def create_upload() -> Response:
    state = uploads().create(request.headers.get("Upload-Length"), request.headers.get("Upload-Metadata"),
                             current_principal().name, defer=request.headers.get("Upload-Defer-Length"))
    response = Response(status=201)
    response.headers["Location"] = url_for("uploads.upload_status", upload_id=state.id)
    return _state_headers(response, state)


@bp.get("/<upload_id>")
@documented(
    "An upload's state (HEAD: the tus headers only)", tag=UPLOADS, response=schemas.UploadStatus,
    errors=(410, 412), success_headers={**_TUS, **_OFFSET, **_LENGTH},
    description="`HEAD` is tus's offset request: `Upload-Offset` says where to resume. 410 once an "
                "unfinished upload expired.")
@requires("producer")
def upload_status(upload_id: str) -> Response:
    state = uploads().get(upload_id)
    return _state_headers(respond(state), state)


@bp.patch("/<upload_id>")
@documented(
    "Append a chunk (tus core)", tag=UPLOADS, success=204,
    headers=("Upload-Offset", "Upload-Checksum", "Tus-Resumable"), errors=(400, 409, 410, 412, 413, 415, 460, 507),
    request_content={"application/offset+octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    success_headers={**_TUS, **_OFFSET, **_EXPIRES},
    description="The body is appended at `Upload-Offset`, which must be the upload's offset (409 "
                "otherwise, with the right one in `Upload-Offset`), and fsynced before the 204. "
                "`Upload-Checksum: sha256 <base64>` (or sha1, md5) is checked: 460 and nothing appended "
                "when it differs. 413 past the declared length, 507 when the disk is too full (nothing "
                "appended). The last chunk checks the whole file against a declared `sha256`.")
@requires("producer")
def patch_upload(upload_id: str) -> Response:
    request.max_content_length = uploads().settings.max_bytes
    try:
        state = uploads().patch(upload_id, request.headers.get("Upload-Offset"), request.content_type,
                                request.headers.get("Upload-Checksum"), body_reader(request.environ, request.stream),
                                request.content_length)
    except OffsetMismatch as exc:
        g.upload_offset = exc.extra.get("upload_offset")
        raise
    response = Response(status=204)
    return _state_headers(response, state)


@bp.delete("/<upload_id>")
@documented("Delete an upload (tus termination)", tag=UPLOADS, success=204, errors=(409, 412),
            headers=("Tus-Resumable",), success_headers=_TUS,
            description="An unfinished upload's bytes go at once; a finished one's record goes, its bytes "
                        "stay while a job names them.")
@requires("producer")
def delete_upload(upload_id: str) -> Response:
    uploads().terminate(upload_id)
    return Response(status=204)
