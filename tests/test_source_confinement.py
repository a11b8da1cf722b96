"""Source confinement: no variant of a path, a link or a URL serves a byte from outside the roots.

At create, ``source_file_path`` must be a readable regular file that resolves (following every
symlink) inside one of the roots, else 422 naming the field. At download the path is checked again
on the descriptor actually opened: swapped for a symlink or a special file since, 403; deleted
since, 404. Every response body is checked for the bytes of the file outside the roots.
"""
from __future__ import annotations

import os
import socket
import stat
import threading
from pathlib import Path
from typing import Callable

import pytest

from support.actions import WorkerActions, auth
from morag_remote import create_app
from morag_remote.context import KEYS, SERVICE
from morag_remote.exceptions import SourceForbidden
from morag_remote.sources import open_source
from morag_remote.store.base import JobFilter

J = "/api/v1/remote-jobs"
SECRET = b"TOP-SECRET: bytes that live outside every source root"
INSIDE = b"inside bytes, fine to serve " * 8


@pytest.fixture
def root(instance_path: Path) -> Path:
    return instance_path / "sources"


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A directory next to the instance, with a secret file in it."""
    path = tmp_path / "outside"
    path.mkdir()
    (path / "secret.txt").write_bytes(SECRET)
    return path


def create(client, headers, source_file_path: str):
    return client.post(f"{J}/", headers=headers, json={
        "source_file_path": source_file_path, "content_type": "audio", "ingestion_task_id": "confine"})


def assert_refused_at_create(response, service) -> None:
    assert response.status_code == 422, response.json
    assert response.mimetype == "application/problem+json"
    assert response.json["detail"].startswith("source_file_path ")
    assert "source_file_path" in response.json["errors"]
    assert SECRET not in response.data
    jobs, _ = service.list(JobFilter(), None, 10)
    assert jobs == []


def _symlink(link: Path, target: str | Path) -> Path:
    os.symlink(target, link)
    return link


def _fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def _unix_socket(path: Path) -> Path:
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(path))
    sock.close()
    return path


# Each builds a path (creating links or special files as needed) from (root, outside).
REFUSED_AT_CREATE: dict[str, Callable[[Path, Path], str]] = {
    "absolute path outside the roots": lambda r, o: str(o / "secret.txt"),
    "system file": lambda r, o: "/etc/passwd",
    "dot-dot segments from a root": lambda r, o: f"{r}/../../outside/secret.txt",
    "relative dot-dot segments": lambda r, o: "../../outside/secret.txt",
    "dot-dot after a real subdirectory": lambda r, o: (r / "sub").mkdir() or f"{r}/sub/../../../outside/secret.txt",
    "symlink inside a root pointing out (absolute)": lambda r, o: str(_symlink(r / "link.bin", o / "secret.txt")),
    "symlink inside a root pointing out (relative)": lambda r, o: str(
        _symlink(r / "rel.bin", "../../outside/secret.txt")),
    "symlink inside a root pointing out, given relative": lambda r, o: _symlink(
        r / "rel2.bin", o / "secret.txt").name,
    "chain of symlinks ending outside": lambda r, o: str(
        _symlink(r / "a.bin", _symlink(r / "b.bin", o / "secret.txt"))),
    "symlinked directory pointing out": lambda r, o: str(_symlink(r / "linkdir", o) / "secret.txt"),
    "dangling symlink pointing out": lambda r, o: str(_symlink(r / "dangling.bin", o / "missing.txt")),
    "symlink loop": lambda r, o: (_symlink(r / "loop1", r / "loop2"), str(_symlink(r / "loop2", r / "loop1")))[1],
    "NUL byte": lambda r, o: f"{r}/ok.bin\x00/../../outside/secret.txt",
    "sibling directory sharing the root's name as prefix": lambda r, o: (
        (r.parent / "sources-evil").mkdir(), (r.parent / "sources-evil" / "s.txt").write_bytes(SECRET),
        str(r.parent / "sources-evil" / "s.txt"))[2],
    "percent-encoded dot-dot (not decoded)": lambda r, o: f"{r}/%2e%2e/%2e%2e/outside/secret.txt",
    "backslash traversal": lambda r, o: "..\\..\\outside\\secret.txt",
    "tilde (not expanded)": lambda r, o: "~/secret.txt",
    "file URL": lambda r, o: f"file://{o}/secret.txt",
    "through /proc/self/root": lambda r, o: f"/proc/self/root{o}/secret.txt",
    "symlink to a device": lambda r, o: str(_symlink(r / "zero.bin", "/dev/zero")),
    "nonexistent file inside a root": lambda r, o: str(r / "missing.bin"),
    "name too long": lambda r, o: str(r / ("x" * 300)),
    "a directory": lambda r, o: ((r / "subdir").mkdir(), str(r / "subdir"))[1],
    "the root itself": lambda r, o: str(r),
    "the root with a trailing slash": lambda r, o: f"{r}/",
    "a FIFO": lambda r, o: str(_fifo(r / "pipe.bin")),
    "a unix socket": lambda r, o: str(_unix_socket(r / "sock.bin")),
}


@pytest.mark.parametrize("variant", REFUSED_AT_CREATE)
def test_create_refuses_source_outside_roots_or_not_a_regular_file(variant, client, keys, service, root, outside):
    path = REFUSED_AT_CREATE[variant](root, outside)
    assert_refused_at_create(create(client, auth(keys["producer"]), path), service)


def test_create_refuses_a_device_node_inside_a_root(client, keys, service, root):
    try:
        os.mknod(root / "null.bin", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    except PermissionError:
        pytest.skip("creating a device node needs CAP_MKNOD")
    assert_refused_at_create(create(client, auth(keys["producer"]), str(root / "null.bin")), service)


def test_create_refuses_a_file_the_server_cannot_read(client, keys, service, root):
    path = root / "locked.bin"
    path.write_bytes(INSIDE)
    path.chmod(0)
    if os.access(path, os.R_OK):
        pytest.skip("running as a user that reads any file")
    assert_refused_at_create(create(client, auth(keys["producer"]), str(path)), service)


def test_refusal_says_which_rule_was_broken(client, keys, root, outside):
    headers = auth(keys["producer"])
    assert "outside the configured source roots" in create(client, headers, str(outside / "secret.txt")).json["detail"]
    assert "does not exist" in create(client, headers, str(root / "missing.bin")).json["detail"]
    (root / "d").mkdir()
    assert "not a regular file (it is a directory)" in create(client, headers, str(root / "d")).json["detail"]
    assert "NUL byte" in create(client, headers, "a\x00b").json["detail"]


# -- what is accepted is served, byte for byte ------------------------------------------------------

def claim_and_download(client, keys, job_id: str, **headers: str):
    worker = WorkerActions(client, keys["worker"], "w-confine")
    claimed = worker.claim("audio")
    assert claimed["job_id"] == job_id
    return worker.download(claimed["source_file_url"], **headers)


def test_relative_path_is_taken_inside_the_first_root(client, keys, root):
    (root / "rel.bin").write_bytes(INSIDE)
    created = create(client, auth(keys["producer"]), "rel.bin")
    assert created.status_code == 201
    assert claim_and_download(client, keys, created.json["job_id"]).data == INSIDE


def test_symlink_inside_a_root_to_a_file_inside_is_served(client, keys, root):
    (root / "real.bin").write_bytes(INSIDE)
    os.symlink(root / "real.bin", root / "alias.bin")
    created = create(client, auth(keys["producer"]), str(root / "alias.bin"))
    assert created.status_code == 201
    response = claim_and_download(client, keys, created.json["job_id"])
    assert response.status_code == 200 and response.data == INSIDE


def _app_with_roots(instance_path: Path, roots: list[str]):
    app = create_app({"TESTING": True, "INSTANCE_PATH": str(instance_path), "LOG_JSON": True,
                      "SOURCE_ROOTS": roots})
    store = app.extensions[KEYS]
    keys = {role: store.create(f"{role}-{len(store.list())}", role)[1] for role in ("producer", "worker")}
    return app, app.test_client(), keys


def test_root_given_with_a_trailing_slash_confines_the_same(tmp_path, outside):
    root = tmp_path / "media"
    root.mkdir()
    (root / "ok.bin").write_bytes(INSIDE)
    sibling = tmp_path / "media-evil"
    sibling.mkdir()
    (sibling / "s.bin").write_bytes(SECRET)
    app, client, keys = _app_with_roots(tmp_path / "inst", [f"{root}/"])
    assert_refused_at_create(create(client, auth(keys["producer"]), str(sibling / "s.bin")), app.extensions[SERVICE])
    assert_refused_at_create(create(client, auth(keys["producer"]), f"{root}/../outside/secret.txt"),
                             app.extensions[SERVICE])
    created = create(client, auth(keys["producer"]), str(root / "ok.bin"))
    assert created.status_code == 201
    assert claim_and_download(client, keys, created.json["job_id"]).data == INSIDE


def test_root_that_is_itself_a_symlink_serves_what_is_inside_its_target(tmp_path, outside):
    real_root = tmp_path / "real-media"
    real_root.mkdir()
    (real_root / "ok.bin").write_bytes(INSIDE)
    link_root = tmp_path / "media-link"
    os.symlink(real_root, link_root)
    app, client, keys = _app_with_roots(tmp_path / "inst", [str(link_root)])
    service = app.extensions[SERVICE]
    assert_refused_at_create(create(client, auth(keys["producer"]), str(outside / "secret.txt")), service)
    assert_refused_at_create(create(client, auth(keys["producer"]), f"{link_root}/../outside/secret.txt"), service)
    for path in (link_root / "ok.bin", real_root / "ok.bin"):
        created = create(client, auth(keys["producer"]), str(path))
        assert created.status_code == 201
        assert claim_and_download(client, keys, created.json["job_id"]).data == INSIDE


def test_second_root_is_a_root_too(tmp_path):
    first, second = tmp_path / "one", tmp_path / "two"
    first.mkdir()
    second.mkdir()
    (second / "x.bin").write_bytes(INSIDE)
    app, client, keys = _app_with_roots(tmp_path / "inst", [str(first), str(second)])
    created = create(client, auth(keys["producer"]), str(second / "x.bin"))
    assert created.status_code == 201
    assert claim_and_download(client, keys, created.json["job_id"]).data == INSIDE


# -- checked again when served -------------------------------------------------------------------------

@pytest.fixture
def claimed_job(client, keys, root):
    """A job on root/sub/input.bin, claimed: (path, worker, claimed job)."""
    (root / "sub").mkdir()
    path = root / "sub" / "input.bin"
    path.write_bytes(INSIDE)
    created = create(client, auth(keys["producer"]), str(path))
    assert created.status_code == 201
    worker = WorkerActions(client, keys["worker"], "w-swap")
    return path, worker, worker.claim("audio")


def _swap_file_for_symlink(path: Path, outside: Path) -> None:
    path.unlink()
    os.symlink(outside / "secret.txt", path)


def _swap_file_for_relative_symlink(path: Path, outside: Path) -> None:
    path.unlink()
    os.symlink(os.path.relpath(outside / "secret.txt", path.parent), path)


def _swap_directory_for_symlink(path: Path, outside: Path) -> None:
    (outside / path.name).write_bytes(SECRET)
    path.parent.rename(path.parent.with_name("sub-old"))
    os.symlink(outside, path.parent)


def _swap_directory_for_a_file(path: Path, outside: Path) -> None:
    path.parent.rename(path.parent.with_name("sub-old"))
    path.parent.write_bytes(INSIDE)


def _swap_file_for_fifo(path: Path, outside: Path) -> None:
    path.unlink()
    os.mkfifo(path)


def _swap_file_for_directory(path: Path, outside: Path) -> None:
    path.unlink()
    path.mkdir()


def _swap_file_for_socket(path: Path, outside: Path) -> None:
    path.unlink()
    _unix_socket(path)


SWAPS = {
    "file swapped for a symlink pointing out": _swap_file_for_symlink,
    "file swapped for a relative symlink pointing out": _swap_file_for_relative_symlink,
    "parent directory swapped for a symlink pointing out": _swap_directory_for_symlink,
    "parent directory swapped for a regular file": _swap_directory_for_a_file,
    "file swapped for a FIFO": _swap_file_for_fifo,
    "file swapped for a directory": _swap_file_for_directory,
    "file swapped for a unix socket": _swap_file_for_socket,
}


@pytest.mark.parametrize("swap", SWAPS)
def test_download_refuses_a_source_swapped_since_create(swap, claimed_job, outside):
    path, worker, claimed = claimed_job
    SWAPS[swap](path, outside)
    response = worker.download(claimed["source_file_url"])
    assert response.status_code == 403
    assert response.mimetype == "application/problem+json"
    assert SECRET not in response.data


def test_a_stored_path_with_a_nul_byte_is_never_opened(root):
    """Create refuses such a path; a record written by other means is refused at serve time too."""
    with pytest.raises(SourceForbidden):
        open_source(f"{root}/ok.bin\x00/../../etc/passwd", [str(root)])


def test_range_request_on_a_swapped_source_is_refused_too(claimed_job, outside):
    path, worker, claimed = claimed_job
    _swap_file_for_symlink(path, outside)
    response = worker.download(claimed["source_file_url"], Range="bytes=0-10")
    assert response.status_code == 403
    assert SECRET[:11] not in response.data


def test_download_of_a_deleted_source_is_404_with_a_clear_detail(claimed_job):
    path, worker, claimed = claimed_job
    path.unlink()
    response = worker.download(claimed["source_file_url"])
    assert response.status_code == 404
    assert response.json["title"] == "Source file not found"
    assert "no longer exists" in response.json["detail"]
    assert path.name in response.json["detail"]


@pytest.mark.files_only
def test_download_rechecks_against_the_roots_configured_now(claimed_job, instance_path, tmp_path):
    path, worker, claimed = claimed_job
    elsewhere = tmp_path / "new-root"
    elsewhere.mkdir()
    app = create_app({"TESTING": True, "INSTANCE_PATH": str(instance_path), "LOG_JSON": True,
                      "SOURCE_ROOTS": [str(elsewhere)]})
    response = app.test_client().get(claimed["source_file_url"], headers=worker.headers)
    assert response.status_code == 403
    assert INSIDE not in response.data


def test_download_serves_the_source_while_nothing_changed(claimed_job):
    _, worker, claimed = claimed_job
    response = worker.download(claimed["source_file_url"])
    assert response.status_code == 200 and response.data == INSIDE


@pytest.mark.slow
@pytest.mark.parametrize("target", ["file", "directory"])
def test_no_download_leaks_while_the_source_flips_between_file_and_symlink(target, claimed_job, outside):
    """A real race: one thread keeps swapping the source (or its directory) for a symlink out of the
    roots and back while downloads run; every answer is the inside bytes, a 403 or a 404."""
    path, worker, claimed = claimed_job
    (outside / path.name).write_bytes(SECRET)
    stop = threading.Event()
    flips = [0]

    def flip_file() -> None:
        tmp_link, tmp_file = path.with_name(".link"), path.with_name(".file")
        while not stop.is_set() and flips[0] < 100_000:
            os.symlink(outside / "secret.txt", tmp_link)
            os.replace(tmp_link, path)
            tmp_file.write_bytes(INSIDE)
            os.replace(tmp_file, path)
            flips[0] += 1

    def flip_directory() -> None:
        directory = path.parent
        real, link = directory.with_name("sub-real"), directory.with_name("sub-link")
        directory.rename(real)
        os.symlink(outside, link)
        while not stop.is_set() and flips[0] < 100_000:
            os.rename(link, directory)       # directory is now the symlink pointing out
            os.rename(directory, link)
            os.rename(real, directory)       # and the real directory again
            os.rename(directory, real)
            flips[0] += 1

    thread = threading.Thread(target=flip_file if target == "file" else flip_directory, daemon=True)
    thread.start()
    seen: dict[int, int] = {}
    try:
        for _ in range(400):
            response = worker.download(claimed["source_file_url"])
            assert SECRET not in response.data
            # 409: the file was replaced since the job was created (a new inode), which the
            # download refuses rather than serve bytes it cannot vouch for
            assert response.status_code in (200, 403, 404, 409), response.data
            if response.status_code == 200:
                assert response.data == INSIDE
            seen[response.status_code] = seen.get(response.status_code, 0) + 1
    finally:
        stop.set()
        thread.join(timeout=10)
    assert flips[0] > 0
    assert sum(seen.values()) == 400


# -- the download URL cannot be bent into a path ----------------------------------------------------------

ENCODED_URLS = [
    "/api/v1/remote-jobs/..%2F..%2Fetc%2Fpasswd/download",
    "/api/v1/remote-jobs/..%2f..%2f..%2f..%2fetc%2fpasswd/download",
    "/api/v1/remote-jobs/%2e%2e%2f%2e%2e%2fetc%2fpasswd/download",
    "/api/v1/remote-jobs/%2e%2e/%2e%2e/etc/passwd/download",
    "/api/v1/remote-jobs/%2e%2e/download",
    "/api/v1/remote-jobs/..%252F..%252Fetc%252Fpasswd/download",
    "/api/v1/remote-jobs/..%5c..%5cetc%5cpasswd/download",
    "/api/v1/remote-jobs/%2Fetc%2Fpasswd/download",
    "/api/v1/remote-jobs/..%00/download",
    "/api/v1/remote-jobs/%c0%ae%c0%ae%c0%af%c0%ae%c0%aeetc/download",
    "/api/v1/remote-jobs/....%2F%2F....%2F%2Fetc%2Fpasswd/download",
    "/api/v1/remote-jobs/{job}%2F..%2F..%2F..%2F..%2Foutside%2Fsecret.txt/download",
    "/api/v1/remote-jobs/{job}/download/..%2F..%2Foutside%2Fsecret.txt",
    "/api/v1/remote-jobs/{job}/..%2F..%2F..%2Foutside%2Fsecret.txt",
    "/api/v1/remote-jobs/{job}/download?path=../../outside/secret.txt&file=/etc/passwd",
    "/api/v1/remote-jobs/{job}/download?token=../../outside/secret.txt",
]


@pytest.mark.parametrize("url", ENCODED_URLS)
@pytest.mark.parametrize("who", ["admin", "worker"])
def test_percent_encoded_traversal_in_the_download_url_serves_nothing_outside(url, who, client, keys, claimed_job,
                                                                              outside):
    _, _, claimed = claimed_job
    response = client.get(url.format(job=claimed["job_id"]), headers=auth(keys[who]))
    assert SECRET not in response.data
    assert b"root:x:0:0" not in response.data
    if response.status_code == 200:  # only the job's own source, and only through its own route
        assert response.data == INSIDE
    else:
        assert response.status_code in (403, 404, 405), response.data
        assert response.mimetype == "application/problem+json"
