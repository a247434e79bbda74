"""A small in-memory, Hub-compatible HTTP server on 127.0.0.1 for the Hub tests (standard library only).

It speaks the subset of the Hugging Face Hub API that ``huggingface_hub`` 2.x uses to create a repo, upload a
folder and download files, so the real client code runs end to end without any network beyond loopback:

==========================================================  ===============================================
``POST /api/repos/create``                                  create a model repo (409 when it exists)
``GET  /api/models/{repo}[/revision/{rev}]``                repo info (sha, siblings)
``GET  /api/models/{repo}/refs``                            branches
``POST /api/models/{repo}/branch/{branch}``                 create a branch (409 when it exists)
``POST /api/validate-yaml``                                 model-card metadata check
``POST /api/models/{repo}/preupload/{rev}``                 upload mode per file: ``lfs`` for weights
``POST /{repo}.git/info/lfs/objects/batch``                 LFS batch API, "basic" transfer
``PUT  /lfs-upload/{oid}``, ``POST /lfs-verify/{oid}``       LFS object upload and verify (checks the sha256)
``POST /api/models/{repo}/commit/{rev}``                    NDJSON commit (header, file, lfsFile, deletedFile)
``HEAD|GET /{repo}/resolve/{rev}/{path}``                   file metadata (X-Repo-Commit, ETag, X-Linked-*) /
                                                            download
==========================================================  ===============================================

Behaviour the tests rely on, as on the real Hub:

* commits are atomic: the whole NDJSON body is read and checked (every LFS object uploaded and verified) before
  the branch moves; a failure anywhere leaves the branch where it was;
* tokens: ``Authorization: Bearer <token>``; an unknown token gets 401 "Invalid credentials in Authorization
  header" on every endpoint; writes need a known token whose user owns the repo namespace (else 401 / 403);
  private repos answer 404 ``RepoNotFound`` to others;
* errors carry ``X-Error-Code`` (``RepoNotFound``, ``RevisionNotFound``, ``EntryNotFound``) so the client raises
  its typed errors.

Xet storage is not implemented: tests set ``HF_HUB_DISABLE_XET`` so the client uses the LFS protocol.
Failure injection: ``server.drop_next_commit()`` makes the next commit request fail halfway through reading its
body (the connection is closed without an answer), as a network failure mid-upload would.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")


def git_blob_sha1(content: bytes) -> str:
    """The git object id of a file, which the Hub uses as the ETag / oid of regular files."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@dataclass
class StoredFile:
    content: bytes
    lfs: bool

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.content).hexdigest()

    @property
    def oid(self) -> str:
        """What the Hub reports as the file's oid: sha256 for LFS files, the git blob id otherwise."""
        return self.sha256 if self.lfs else git_blob_sha1(self.content)


@dataclass
class Commit:
    oid: str
    parent: str | None
    message: str
    files: dict[str, StoredFile]


@dataclass
class Repo:
    repo_id: str
    private: bool
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)

    def resolve(self, revision: str) -> Commit | None:
        """A branch name or a full commit oid -> the commit."""
        oid = self.branches.get(revision, revision)
        return self.commits.get(oid)


class HubServer:
    """An in-memory Hub on ``http://127.0.0.1:<free port>``; use as a context manager or start()/stop().

    Args:
        tokens: ``{token: user name}``; these tokens may write to repos in their user's namespace.
    """

    def __init__(self, tokens: dict[str, str] | None = None):
        self.tokens = dict(tokens or {})
        self.repos: dict[str, Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}  # sha256 -> content, uploaded and verified
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request, for assertions
        self._lock = threading.Lock()
        self._drop_next_commit = False
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle -------------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        if self._httpd is None:
            raise RuntimeError("the server is not running; call start() first")
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> HubServer:
        handler = type("BoundHubHandler", (_HubHandler,), {"hub": self})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="hub-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._thread.join(timeout=10)
            self._httpd = self._thread = None

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- test helpers ----------------------------------------------------------------------------------
    def drop_next_commit(self) -> None:
        """Make the next commit request fail mid-body: the server reads half of it and closes the connection."""
        self._drop_next_commit = True

    def head(self, repo_id: str, branch: str = "main") -> str:
        """The commit oid a branch points to."""
        return self.repos[repo_id].branches[branch]

    def file(self, repo_id: str, path: str, revision: str = "main") -> bytes:
        return self.repos[repo_id].resolve(revision).files[path].content


class _HubHandler(BaseHTTPRequestHandler):
    hub: HubServer  # bound by HubServer.start
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # keep test output clean
        pass

    # --- plumbing --------------------------------------------------------------------------------------
    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def _dispatch(self, method: str) -> None:
        parts = urlsplit(self.path)
        path, query = unquote(parts.path), parse_qs(parts.query)
        self.hub.requests.append((method, path))
        try:
            user = self._authenticate()
            if user is False:
                return
            self._route(method, path, query, user)
        except _Dropped:
            self.close_connection = True
        except Exception as exc:  # a bug in the server: answer 500 with the reason rather than hang the client
            self._send_json(500, {"error": f"test hub server error: {exc!r}"})

    def _authenticate(self) -> str | None | bool:
        """The user of the bearer token, None without a token, False after answering 401 to an unknown token."""
        header = self.headers.get("Authorization", "")
        if not header.startswith("Bearer "):
            return None
        user = self.hub.tokens.get(header[len("Bearer ") :].strip())
        if user is None:
            self._read_body()
            self._send_json(
                401,
                {"error": "Invalid credentials in Authorization header"},
                error_message="Invalid credentials in Authorization header",
            )
            return False
        return user

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()  # the empty line after the last chunk
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_json(
        self,
        status: int,
        payload: Any,
        error_code: str | None = None,
        error_message: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        extra = dict(headers or {})
        extra["Content-Type"] = "application/json"
        if error_code:
            extra["X-Error-Code"] = error_code
        if error_message:
            extra["X-Error-Message"] = error_message
        self._send(status, json.dumps(payload).encode(), extra)

    def _error(self, status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None) -> None:
        self._read_body()
        self._send_json(status, {"error": message}, error_code=code, error_message=message, headers=headers)

    # --- routing ---------------------------------------------------------------------------------------
    def _route(self, method: str, path: str, query: dict[str, list[str]], user: str | None) -> None:
        segments = [s for s in path.split("/") if s]
        if method == "POST" and path == "/api/repos/create":
            return self._create_repo(user)
        if method == "POST" and path == "/api/validate-yaml":
            self._read_body()
            return self._send_json(200, {"errors": [], "warnings": []})
        if method == "PUT" and len(segments) == 2 and segments[0] == "lfs-upload":
            return self._lfs_upload(segments[1])
        if method == "POST" and len(segments) == 2 and segments[0] == "lfs-verify":
            return self._lfs_verify(segments[1])
        if segments[:2] == ["api", "models"] and len(segments) >= 4:
            repo_id, rest = "/".join(segments[2:4]), segments[4:]
            if method == "GET" and not rest:
                return self._repo_info(repo_id, "main", user)
            if method == "GET" and len(rest) >= 2 and rest[0] == "revision":
                return self._repo_info(repo_id, "/".join(rest[1:]), user)
            if method == "GET" and rest == ["refs"]:
                return self._refs(repo_id, user)
            if method == "POST" and len(rest) >= 2 and rest[0] == "branch":
                return self._create_branch(repo_id, "/".join(rest[1:]), user)
            if method == "POST" and len(rest) >= 2 and rest[0] == "preupload":
                return self._preupload(repo_id, "/".join(rest[1:]), user)
            if method == "POST" and len(rest) >= 2 and rest[0] == "commit":
                return self._commit(repo_id, "/".join(rest[1:]), user)
        if method == "POST" and segments[2:] == ["info", "lfs", "objects", "batch"] and segments[1].endswith(".git"):
            return self._lfs_batch(f"{segments[0]}/{segments[1].removesuffix('.git')}", user)
        if method in ("GET", "HEAD") and len(segments) >= 5 and segments[2] == "resolve":
            return self._resolve(f"{segments[0]}/{segments[1]}", segments[3], "/".join(segments[4:]), user)
        self._error(404, f"test hub server: no route for {method} {path}")

    # --- repos -----------------------------------------------------------------------------------------
    def _readable_repo(self, repo_id: str, user: str | None) -> Repo | None:
        repo = self.hub.repos.get(repo_id)
        if repo is None or (repo.private and user != repo_id.split("/")[0]):
            self._error(404, "Repository not found", code="RepoNotFound")
            return None
        return repo

    def _writable_repo(self, repo_id: str, user: str | None) -> Repo | None:
        if user is None:
            self._error(401, "You must be authenticated to write to a repo")
            return None
        repo = self._readable_repo(repo_id, user)
        if repo is not None and repo_id.split("/")[0] != user:
            self._error(403, f"You don't have the rights to write to {repo_id}")
            return None
        return repo

    def _create_repo(self, user: str | None) -> None:
        payload = json.loads(self._read_body() or b"{}")
        if user is None:
            return self._send_json(401, {"error": "You must be authenticated to create a repo"})
        namespace = payload.get("organization") or user
        if namespace != user:
            return self._send_json(403, {"error": f"You don't have the rights to create a repo in {namespace}"})
        repo_id = f"{namespace}/{payload['name']}"
        with self.hub._lock:
            if repo_id in self.hub.repos:
                return self._send_json(
                    409, {"error": "You already created this model repo", "url": f"{self.hub.url}/{repo_id}"}
                )
            repo = Repo(repo_id, private=payload.get("visibility") == "private" or bool(payload.get("private")))
            initial = Commit(_commit_oid(None, "initial commit", {}), None, "initial commit", {})
            repo.commits[initial.oid] = initial
            repo.branches["main"] = initial.oid
            self.hub.repos[repo_id] = repo
        self._send_json(200, {"url": f"{self.hub.url}/{repo_id}", "name": repo_id, "id": repo_id})

    def _repo_info(self, repo_id: str, revision: str, user: str | None) -> None:
        repo = self._readable_repo(repo_id, user)
        if repo is None:
            return
        commit = repo.resolve(revision)
        if commit is None:
            return self._error(404, f"Invalid rev id: {revision}", code="RevisionNotFound")
        self._send_json(
            200,
            {
                "id": repo_id,
                "modelId": repo_id,
                "sha": commit.oid,
                "private": repo.private,
                "siblings": [{"rfilename": name} for name in sorted(commit.files)],
            },
        )

    def _refs(self, repo_id: str, user: str | None) -> None:
        repo = self._readable_repo(repo_id, user)
        if repo is not None:
            branches = [{"name": n, "ref": f"refs/heads/{n}", "targetCommit": oid} for n, oid in repo.branches.items()]
            self._send_json(200, {"branches": branches, "converts": [], "tags": []})

    def _create_branch(self, repo_id: str, branch: str, user: str | None) -> None:
        repo = self._writable_repo(repo_id, user)
        if repo is None:
            return
        payload = json.loads(self._read_body() or b"{}")
        with self.hub._lock:
            if branch in repo.branches:
                return self._send_json(409, {"error": f"Branch {branch} already exists"})
            start = repo.resolve(payload.get("startingPoint") or "main")
            if start is None:
                return self._send_json(404, {"error": "Invalid starting point"}, error_code="RevisionNotFound")
            repo.branches[branch] = start.oid
        self._send_json(200, {})

    # --- upload ----------------------------------------------------------------------------------------
    def _preupload(self, repo_id: str, revision: str, user: str | None) -> None:
        repo = self._writable_repo(repo_id, user)
        if repo is None:
            return
        payload = json.loads(self._read_body())
        head = repo.resolve(revision)
        files = []
        for entry in payload["files"]:
            lfs = entry["path"].endswith(LFS_SUFFIXES) or entry["size"] > 10 * 2**20
            existing = head.files.get(entry["path"]) if head is not None else None
            files.append(
                {
                    "path": entry["path"],
                    "uploadMode": "lfs" if lfs else "regular",
                    "shouldIgnore": False,
                    "oid": existing.oid if existing is not None else None,
                }
            )
        self._send_json(200, {"files": files, "commitOid": head.oid if head is not None else None})

    def _lfs_batch(self, repo_id: str, user: str | None) -> None:
        if self._writable_repo(repo_id, user) is None:
            return
        payload = json.loads(self._read_body())
        objects = []
        for obj in payload["objects"]:
            entry = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] not in self.hub.lfs_objects:
                entry["actions"] = {
                    "upload": {"href": f"{self.hub.url}/lfs-upload/{obj['oid']}", "header": {}},
                    "verify": {"href": f"{self.hub.url}/lfs-verify/{obj['oid']}", "header": {}},
                }
            objects.append(entry)
        self._send_json(
            200, {"transfer": "basic", "objects": objects}, headers={"Content-Type": "application/vnd.git-lfs+json"}
        )

    def _lfs_upload(self, oid: str) -> None:
        content = self._read_body()
        if hashlib.sha256(content).hexdigest() != oid:
            return self._send_json(400, {"error": "content does not match the oid"})
        with self.hub._lock:
            self.hub.lfs_objects[oid] = content
        self._send(200)

    def _lfs_verify(self, oid: str) -> None:
        payload = json.loads(self._read_body())
        content = self.hub.lfs_objects.get(oid)
        if content is None or len(content) != payload.get("size"):
            return self._send_json(404, {"error": f"LFS object {oid} was not uploaded"})
        self._send_json(200, {})

    def _commit(self, repo_id: str, revision: str, user: str | None) -> None:
        repo = self._writable_repo(repo_id, user)
        if repo is None:
            return
        if self.hub._drop_next_commit:
            self.hub._drop_next_commit = False
            self.rfile.read(int(self.headers.get("Content-Length") or 2) // 2)
            raise _Dropped
        lines = [json.loads(line) for line in self._read_body().splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            return self._send_json(400, {"error": "the first NDJSON line must be the commit header"})
        header = lines[0]["value"]
        with self.hub._lock:
            head_oid = repo.branches.get(revision)
            if head_oid is None:
                return self._send_json(404, {"error": f"Invalid rev id: {revision}"}, error_code="RevisionNotFound")
            parent = header.get("parentCommit")
            if parent is not None and parent != head_oid:
                return self._send_json(412, {"error": "A commit has happened since. Please refresh and try again."})
            files = dict(repo.commits[head_oid].files)
            for line in lines[1:]:
                key, value = line["key"], line["value"]
                if key == "file":
                    files[value["path"]] = StoredFile(base64.b64decode(value["content"]), lfs=False)
                elif key == "lfsFile":
                    content = self.hub.lfs_objects.get(value["oid"])
                    if content is None:  # atomic: refuse the whole commit, the branch does not move
                        return self._send_json(422, {"error": f"LFS file {value['path']} was not uploaded"})
                    files[value["path"]] = StoredFile(content, lfs=True)
                elif key == "deletedFile":
                    files.pop(value["path"], None)
                elif key == "deletedFolder":
                    files = {p: f for p, f in files.items() if not p.startswith(value["path"].rstrip("/") + "/")}
                else:
                    return self._send_json(400, {"error": f"unknown commit operation {key!r}"})
            commit = Commit(
                _commit_oid(head_oid, header.get("summary", ""), files), head_oid, header.get("summary", ""), files
            )
            repo.commits[commit.oid] = commit
            repo.branches[revision] = commit.oid
        self._send_json(
            200,
            {"commitUrl": f"{self.hub.url}/{repo_id}/commit/{commit.oid}", "commitOid": commit.oid, "success": True},
        )

    # --- download --------------------------------------------------------------------------------------
    def _resolve(self, repo_id: str, revision: str, filename: str, user: str | None) -> None:
        repo = self._readable_repo(repo_id, user)
        if repo is None:
            return
        commit = repo.resolve(revision)
        if commit is None:
            return self._error(404, f"Invalid rev id: {revision}", code="RevisionNotFound")
        stored = commit.files.get(filename)
        if stored is None:
            return self._error(404, "Entry not found", code="EntryNotFound", headers={"X-Repo-Commit": commit.oid})
        headers = {
            "X-Repo-Commit": commit.oid,
            "ETag": f'"{git_blob_sha1(stored.content)}"',
            "Content-Type": "application/octet-stream",
        }
        if stored.lfs:
            headers.update({"X-Linked-Etag": f'"{stored.sha256}"', "X-Linked-Size": str(len(stored.content))})
        self._send(200, stored.content, headers)


class _Dropped(Exception):
    """Raised to close the connection without an answer (simulated network failure)."""


def _commit_oid(parent: str | None, message: str, files: dict[str, StoredFile]) -> str:
    listing = json.dumps([parent, message, time.time_ns(), sorted((p, f.oid) for p, f in files.items())])
    return hashlib.sha1(listing.encode()).hexdigest()
