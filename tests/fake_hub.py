"""A tiny in-memory Hugging Face Hub on 127.0.0.1, for upload and download tests without a network.

It answers what ``huggingface_hub`` and ``transformers`` ask when one pushes a folder and loads it back:
repository creation, branches, preupload (every file "regular": its bytes travel inside the commit),
model-card YAML validation, the NDJSON commit, model info, tree listings and ``resolve`` (HEAD and GET).  Every request is logged in
``FakeHub.requests`` so that a test can also prove that *no* request was made.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse

import yaml

_REPO = r"(?P<repo>[^/]+/[^/]+)"
_ROUTES = [
    ("POST", re.compile(r"^/api/repos/create$"), "create"),
    ("POST", re.compile(r"^/api/validate-yaml$"), "validate_yaml"),
    ("POST", re.compile(rf"^/api/models/{_REPO}/branch/(?P<rev>[^/]+)$"), "branch"),
    ("POST", re.compile(rf"^/api/models/{_REPO}/preupload/(?P<rev>[^/]+)$"), "preupload"),
    ("POST", re.compile(rf"^/api/models/{_REPO}/commit/(?P<rev>[^/]+)$"), "commit"),
    ("GET", re.compile(rf"^/api/models/{_REPO}(?:/revision/(?P<rev>[^/]+))?$"), "info"),
    ("GET", re.compile(rf"^/api/models/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?$"), "tree"),
    ("HEAD", re.compile(rf"^/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)$"), "resolve"),
    ("GET", re.compile(rf"^/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)$"), "resolve"),
]


class FakeHub:
    """``with FakeHub() as hub:`` serves on ``hub.endpoint``; ``hub.repos[repo_id][branch]`` maps paths to bytes."""

    def __init__(self) -> None:
        self.repos: dict[str, dict[str, dict[str, bytes]]] = {}
        self.requests: list[tuple[str, str]] = []
        self.created: list[dict] = []
        self.commits: dict[str, dict[str, bytes]] = {}
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # keep pytest output clean
                pass

            def do_GET(self) -> None:
                hub._dispatch(self, "GET")

            def do_HEAD(self) -> None:
                hub._dispatch(self, "HEAD")

            def do_POST(self) -> None:
                hub._dispatch(self, "POST")

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> FakeHub:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def put(self, repo: str, files: dict[str, bytes]) -> None:
        """Hold ``files`` as the main branch of ``repo``, as if someone had pushed them."""
        self.repos[repo] = {"main": dict(files)}
        self.commits[self._sha(files)] = dict(files)

    @staticmethod
    def _sha(files: dict[str, bytes]) -> str:
        digest = hashlib.sha1()
        for path in sorted(files):
            digest.update(path.encode() + b"\0" + hashlib.sha1(files[path]).digest())
        return digest.hexdigest()

    def _dispatch(self, req: BaseHTTPRequestHandler, method: str) -> None:
        path = unquote(urlparse(req.path).path)
        self.requests.append((method, path))
        body = req.rfile.read(int(req.headers.get("Content-Length") or 0)) if method == "POST" else b""
        for verb, pattern, name in _ROUTES:
            match = pattern.match(path)
            if verb == method and match:
                return getattr(self, f"_{name}")(req, method, body, **match.groupdict())
        self._reply(req, 404, {"error": f"fake hub: no route for {method} {path}"})

    def _reply(self, req: BaseHTTPRequestHandler, status: int, payload: object = None, *, data: bytes | None = None,
               headers: dict[str, str] | None = None, head: bool = False) -> None:
        data = json.dumps(payload).encode() if data is None else data
        req.send_response(status)
        for key, value in {"Content-Type": "application/json", "Content-Length": str(len(data)), **(headers or {})}.items():
            req.send_header(key, value)
        req.end_headers()
        if not head:
            req.wfile.write(data)

    def _files(self, req: BaseHTTPRequestHandler, repo: str, rev: str | None) -> dict[str, bytes] | None:
        branches = self.repos.get(repo)
        if branches is None:
            self._reply(req, 404, {"error": "Repository not found"}, headers={"X-Error-Code": "RepoNotFound"})
            return None
        files = branches.get(rev or "main", self.commits.get(rev or ""))
        if files is None:
            self._reply(req, 404, {"error": "Revision not found"}, headers={"X-Error-Code": "RevisionNotFound"})
        return files

    def _create(self, req, method, body):
        payload = json.loads(body)
        self.created.append(payload)
        repo = f"{payload['organization']}/{payload['name']}"
        self.repos.setdefault(repo, {"main": {}})
        self._reply(req, 200, {"url": f"{self.endpoint}/{repo}", "name": repo})

    def _validate_yaml(self, req, method, body):
        content = json.loads(body)["content"]
        try:
            meta = yaml.safe_load(content.split("---\n")[1]) if content.startswith("---\n") else None
            assert isinstance(meta, dict), "the card has no YAML metadata block"
        except (yaml.YAMLError, AssertionError) as err:
            self._reply(req, 400, {"errors": [{"message": str(err)}]})
            return
        self._reply(req, 200, {"errors": [], "warnings": []})

    def _branch(self, req, method, body, repo, rev):
        if (files := self._files(req, repo, "main")) is not None:
            self.repos[repo].setdefault(rev, dict(files))
            self._reply(req, 200, {})

    def _preupload(self, req, method, body, repo, rev):
        if self._files(req, repo, rev) is not None:
            files = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                     for f in json.loads(body)["files"]]
            self._reply(req, 200, {"files": files})

    def _commit(self, req, method, body, repo, rev):
        if (files := self._files(req, repo, rev)) is None:
            return
        for line in body.splitlines():
            item = json.loads(line)
            if item["key"] == "file":
                files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            elif item["key"] == "deletedFile":
                files.pop(item["value"]["path"], None)
        sha = self._sha(files)
        self.commits[sha] = dict(files)
        self._reply(req, 200, {"commitUrl": f"{self.endpoint}/{repo}/commit/{sha}", "commitOid": sha,
                               "pullRequestUrl": None})

    def _info(self, req, method, body, repo, rev=None):
        if (files := self._files(req, repo, rev)) is not None:
            self._reply(req, 200, {"id": repo, "modelId": repo, "sha": self._sha(files), "private": False,
                                   "siblings": [{"rfilename": p} for p in sorted(files)], "tags": []})

    def _tree(self, req, method, body, repo, rev, path=None):
        if (files := self._files(req, repo, rev)) is not None:
            prefix = f"{path.rstrip('/')}/" if path else ""
            entries = [{"type": "file", "path": p, "size": len(d), "oid": hashlib.sha1(d).hexdigest()}
                       for p, d in sorted(files.items()) if p.startswith(prefix)]
            self._reply(req, 200, entries)

    def _resolve(self, req, method, body, repo, rev, path):
        if (files := self._files(req, repo, rev)) is None:
            return
        if path not in files:
            self._reply(req, 404, {"error": "Entry not found"}, head=method == "HEAD",
                        headers={"X-Error-Code": "EntryNotFound", "X-Repo-Commit": self._sha(files)})
            return
        data = files[path]
        headers = {"Content-Type": "application/octet-stream", "X-Repo-Commit": self._sha(files),
                   "ETag": f'"{hashlib.sha1(data).hexdigest()}"'}
        self._reply(req, 200, data=data, headers=headers, head=method == "HEAD")
