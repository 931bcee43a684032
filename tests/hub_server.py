"""A small HTTP server on 127.0.0.1 that speaks enough of the Hugging Face Hub's protocol for the
real `huggingface_hub` client (reached through HF_ENDPOINT): file resolve (HEAD/GET, ranges),
repo info and tree listings, for model and dataset repos; and for uploads, repo creation,
preupload (every file goes up as a regular file) and commits. Every change makes a commit whose
sha follows from the repo's content; any earlier commit stays readable by its sha, as on the Hub.
Tests put files in repos and can make paths fail with transient errors.
"""

import base64
import hashlib
import json
import os
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class FakeHub:
    def __init__(self):
        self.repos = {}  # (repo_type, repo_id) -> {path: bytes} at the head of main
        self.history = {}  # (repo_type, repo_id) -> {commit sha: {path: bytes}}
        self.heads = {}  # (repo_type, repo_id) -> commit sha of main
        self.fail = {}  # path suffix -> [remaining failures, HTTP status]
        self.requests = []  # (method, path) of every request
        self.commits = []  # (repo_id, [paths added]) of every commit
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def add_file(self, repo_id, path, data, repo_type="model"):
        if isinstance(data, str) and os.path.exists(data):
            with open(data, "rb") as f:
                data = f.read()
        with self.lock:
            self.repos.setdefault((repo_type, repo_id), {})[path] = bytes(data)
            self._commit((repo_type, repo_id))

    def _commit(self, key):
        """Record the repo's current files as a commit (caller holds the lock)."""
        files = self.repos[key]
        sha = hashlib.sha1(repr(sorted((p, hashlib.sha1(d).hexdigest()) for p, d in files.items())).encode())
        self.heads[key] = sha.hexdigest()
        self.history.setdefault(key, {})[self.heads[key]] = dict(files)

    def files_at(self, key, revision):
        """(files, sha) of a repo at a revision ("main" or a commit sha); (None, None) if unknown."""
        with self.lock:
            if revision in (None, "main"):
                return self.repos[key], self.heads[key]
            files = self.history.get(key, {}).get(revision)
            return (files, revision) if files is not None else (None, None)

    def fail_next(self, path_suffix, times, status=503):
        """The next `times` requests for paths ending in `path_suffix` get HTTP `status`."""
        with self.lock:
            self.fail[path_suffix] = [times, status]

    def close(self):
        self.server.shutdown()
        self.server.server_close()

    def _handler(hub):
        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def send(self, status, body=b"", headers=None, head=False):
                self.send_response(status)
                headers = dict(headers or {})
                headers.setdefault("Content-Length", str(len(body)))
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                if not head:
                    self.wfile.write(body)

            def error(self, status, code, message, head=False):
                body = json.dumps({"error": message}).encode()
                self.send(status, body, {"X-Error-Code": code, "X-Error-Message": message,
                                         "Content-Type": "application/json"}, head)

            def do_HEAD(self):
                self.route(head=True)

            def do_GET(self):
                self.route(head=False)

            def do_POST(self):
                path = urllib.parse.unquote(urllib.parse.urlparse(self.path).path)
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with hub.lock:
                    hub.requests.append(("POST", path))
                    for suffix, failure in hub.fail.items():
                        if failure[0] > 0 and path.endswith(suffix):
                            failure[0] -= 1
                            return self.error(failure[1], "Injected", "injected failure")
                parts = path.strip("/").split("/")
                json_reply = lambda obj: self.send(200, json.dumps(obj).encode(), {"Content-Type": "application/json"})
                if parts[:3] == ["api", "repos", "create"]:
                    request = json.loads(body)
                    repo_type = request.get("type") or "model"
                    repo_id = f"{request['organization']}/{request['name']}"
                    url = f"{hub.endpoint}/{'' if repo_type == 'model' else repo_type + 's/'}{repo_id}"
                    with hub.lock:
                        if (repo_type, repo_id) in hub.repos:  # the Hub names the existing repo's url
                            body = json.dumps({"error": "You already created this repo", "url": url}).encode()
                            return self.send(409, body, {"Content-Type": "application/json"})
                        hub.repos[(repo_type, repo_id)] = {}
                        hub._commit((repo_type, repo_id))
                    return json_reply({"url": url, "name": repo_id})
                if len(parts) >= 6 and parts[0] == "api" and parts[1] in ("models", "datasets"):
                    repo_type, repo_id, action = parts[1][:-1], "/".join(parts[2:4]), parts[4]
                    files = hub.repos.get((repo_type, repo_id))
                    if files is None:
                        return self.error(404, "RepoNotFound", f"repository {repo_id} not found")
                    if action == "preupload":
                        return json_reply({"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                                     for f in json.loads(body)["files"]]})
                    if action == "commit":
                        added = []
                        for line in body.splitlines():
                            item = json.loads(line)
                            if item["key"] == "file":
                                value = item["value"]
                                with hub.lock:
                                    files[value["path"]] = base64.b64decode(value["content"])
                                added.append(value["path"])
                        with hub.lock:
                            hub.commits.append((repo_id, added))
                            hub._commit((repo_type, repo_id))
                            sha = hub.heads[(repo_type, repo_id)]
                        return json_reply({"commitUrl": f"{hub.endpoint}/{repo_id}/commit/{sha}", "commitOid": sha})
                return self.error(404, "RepoNotFound", "no such API route")

            def route(self, head):
                url = urllib.parse.urlparse(self.path)
                path = urllib.parse.unquote(url.path)
                with hub.lock:
                    hub.requests.append((self.command, path))
                    for suffix, failure in hub.fail.items():
                        if failure[0] > 0 and path.endswith(suffix):
                            failure[0] -= 1
                            return self.error(failure[1], "Injected", "injected failure", head)
                parts = path.strip("/").split("/")
                if parts[0] == "api":
                    return self.api(parts[1:], urllib.parse.parse_qs(url.query), head)
                repo_type = "model"
                if parts[0] in ("datasets", "spaces"):
                    repo_type, parts = parts[0][:-1], parts[1:]
                if len(parts) < 5 or parts[2] != "resolve":
                    return self.error(404, "RepoNotFound", "no such route", head)
                repo_id, file_path = "/".join(parts[:2]), "/".join(parts[4:])
                self.resolve(repo_type, repo_id, parts[3], file_path, head)

            def resolve(self, repo_type, repo_id, revision, file_path, head):
                if (repo_type, repo_id) not in hub.repos:
                    return self.error(404, "RepoNotFound", f"repository {repo_id} not found", head)
                files, sha = hub.files_at((repo_type, repo_id), revision)
                if files is None:
                    return self.error(404, "RevisionNotFound", f"revision {revision} not found", head)
                if file_path not in files:
                    return self.error(404, "EntryNotFound", f"{file_path} not found", head)
                data = files[file_path]
                etag = '"%s"' % hashlib.sha256(data).hexdigest()
                headers = {"X-Repo-Commit": sha, "ETag": etag, "Accept-Ranges": "bytes",
                           "Content-Type": "application/octet-stream"}
                rng = self.headers.get("Range")
                if rng and rng.startswith("bytes=") and not head:
                    start, _, end = rng[6:].partition("-")
                    start, end = int(start or 0), int(end) if end else len(data) - 1
                    chunk = data[start:end + 1]
                    headers["Content-Range"] = f"bytes {start}-{start + len(chunk) - 1}/{len(data)}"
                    return self.send(206, chunk, headers)
                if head:
                    headers["Content-Length"] = str(len(data))
                    return self.send(200, b"", headers, head=True)
                self.send(200, data, headers)

            def api(self, parts, query, head):
                # /api/{models|datasets}/{org}/{name}/{revision|tree}/{rev}[/{path}]
                if len(parts) < 3 or parts[0] not in ("models", "datasets"):
                    return self.error(404, "RepoNotFound", "no such API route", head)
                repo_type = parts[0][:-1]
                repo_id = "/".join(parts[1:3])
                if (repo_type, repo_id) not in hub.repos:
                    return self.error(404, "RepoNotFound", f"repository {repo_id} not found", head)
                rest = parts[3:]
                files, sha = hub.files_at((repo_type, repo_id), rest[1] if len(rest) > 1 else "main")
                if files is None:
                    return self.error(404, "RevisionNotFound", f"revision {rest[1]} not found", head)
                if not rest or rest[0] == "revision":
                    body = {"id": repo_id, "sha": sha, "siblings": [{"rfilename": p} for p in sorted(files)]}
                elif rest[0] == "tree":
                    prefix = "/".join(rest[2:])
                    recursive = query.get("recursive", ["false"])[0].lower() == "true"
                    body = self.tree(files, prefix, recursive)
                else:
                    return self.error(404, "RepoNotFound", "no such API route", head)
                self.send(200, json.dumps(body).encode(), {"Content-Type": "application/json"}, head)

            @staticmethod
            def tree(files, prefix, recursive):
                prefix = prefix.strip("/")
                entries, dirs = [], set()
                for p, data in sorted(files.items()):
                    if prefix and not p.startswith(prefix + "/"):
                        continue
                    rel = p[len(prefix) + 1:] if prefix else p
                    if "/" in rel and not recursive:
                        dirs.add((prefix + "/" if prefix else "") + rel.split("/")[0])
                        continue
                    if recursive:
                        for i in range(rel.count("/")):
                            dirs.add((prefix + "/" if prefix else "") + "/".join(rel.split("/")[:i + 1]))
                    entries.append({"type": "file", "path": p, "size": len(data),
                                    "oid": hashlib.sha1(data).hexdigest()})
                return [{"type": "directory", "path": d, "oid": hashlib.sha1(d.encode()).hexdigest()} for d in sorted(dirs)] + entries

        return Handler
