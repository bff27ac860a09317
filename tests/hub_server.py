"""A stand-in for the Hugging Face Hub on 127.0.0.1: what huggingface_hub asks of it to download
model files and to read dataset files through its fsspec filesystem (hf://datasets/ORG/NAME/...).

    Hub.files[(repo_id, filename)] = bytes      # models: /REPO/resolve/REV/FILE (ETag = sha256)
    Hub.datasets[(repo_id, path)] = bytes       # datasets: the API (info, tree, paths-info) and
                                                # /datasets/REPO/resolve/REV/PATH with byte ranges
                                                # (Hub.files[("datasets/" + repo_id, path)] serves too)
    Hub.files[("mirror", "host/path")] = bytes  # GET /mirror/host/path: a file whose home is a plain URL
                                                # (gpt2train.tasks.data's GPT2TRAIN_TASK_MIRROR)
    Hub.bad_etag = {"file"}                     # that file's ETag lies (a failed checksum)
    Hub.drop_once = {"path"}                    # the first ranged read of that dataset file is cut off
    server, endpoint = start()                  # a ThreadingHTTPServer in a daemon thread

A model repository without any file answers RepoNotFound. Uploads, as huggingface_hub makes them:
POST /api/repos/create, /api/validate-yaml, /api/models/REPO/preupload/REV (every file "regular",
so the content comes inline in the commit) and /api/models/REPO/commit/REV (NDJSON), which stores
the files in Hub.files; Hub.tokens keeps the Authorization headers seen, Hub.commits each commit.
"""

import base64
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlparse

COMMIT = "c" * 40


class Hub(BaseHTTPRequestHandler):
    files: dict = {}
    datasets: dict = {}
    bad_etag: set = set()
    drop_once: set = set()
    dropped: list = []  # paths whose connection was cut, in order
    tokens: list = []
    commits: list = []  # (repo_id, commit message, [paths]) of every commit received

    def _serve(self, body: bool):
        parts = urlparse(self.path).path.strip("/").split("/")
        if parts[0] == "mirror":
            data = self.files.get(("mirror", "/".join(parts[1:])))
            return self._not_found() if data is None else self._send(data, parts[-1], body)
        if parts[0] == "api" and len(parts) > 2 and parts[1] == "datasets":
            return self._api(parts[2:], body)
        if parts[0] == "datasets" and len(parts) >= 6 and parts[3] == "resolve":
            return self._dataset_file("/".join(parts[1:3]), unquote("/".join(parts[5:])), body)
        data = None
        if len(parts) >= 5 and parts[2] == "resolve":
            repo = "/".join(parts[:2])
            data = self.files.get((repo, "/".join(parts[4:])))
            if data is None and not any(r == repo for r, _ in self.files):
                return self._not_found("RepoNotFound")
        if data is None:
            return self._not_found()
        self._send(data, parts[-1], body)

    def _send(self, data: bytes, name: str, body: bool):
        digest = hashlib.sha256(data if name not in self.bad_etag else b"something else").hexdigest()
        self.send_response(200)
        self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("ETag", f'"{digest}"')
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)

    # ------------------------------------------------------------ datasets
    def _not_found(self, code: str = "EntryNotFound"):
        self.send_response(404)
        self.send_header("X-Error-Code", code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _json(self, value, status: int = 200):
        data = json.dumps(value).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _entries(self, repo: str) -> dict:
        """path -> tree entry of every file and folder of a dataset repository."""
        out = {}
        for (r, path), data in self.datasets.items():
            if r != repo:
                continue
            out[path] = {"type": "file", "oid": hashlib.sha1(data).hexdigest(), "size": len(data), "path": path}
            folder = path.rsplit("/", 1)[0] if "/" in path else ""
            while folder:
                out.setdefault(folder, {"type": "directory", "oid": hashlib.sha1(folder.encode()).hexdigest(),
                                        "path": folder})
                folder = folder.rsplit("/", 1)[0] if "/" in folder else ""
        return out

    def _api(self, parts, body):
        repo = "/".join(parts[:2])
        entries = self._entries(repo)
        if not entries:
            return self._not_found("RepoNotFound")
        rest = parts[2:]
        if not rest or rest[0] == "revision":  # repo_info
            return self._json({"id": repo, "sha": COMMIT, "private": False, "siblings": [
                {"rfilename": p} for p, e in entries.items() if e["type"] == "file"]})
        if rest[0] == "tree":  # list_repo_tree: /tree/REV[/PATH]
            folder = unquote("/".join(rest[2:])).strip("/")
            recursive = parse_qs(urlparse(self.path).query).get("recursive", ["false"])[0].lower() == "true"
            prefix = folder + "/" if folder else ""
            listed = [e for p, e in entries.items() if p.startswith(prefix)
                      and (recursive or "/" not in p[len(prefix):])]
            if folder and folder not in entries:
                return self._not_found()
            return self._json(listed)
        if rest[0] == "paths-info":  # get_paths_info: POST with form field "paths"
            length = int(self.headers.get("Content-Length") or 0)
            form = parse_qs(self.rfile.read(length).decode()) if length else {}
            wanted = form.get("paths", [])
            return self._json([entries[p] for p in wanted if p in entries])
        return self._not_found()

    def _dataset_file(self, repo: str, path: str, body: bool):
        data = self.datasets.get((repo, path), self.files.get(("datasets/" + repo, path)))
        if data is None:
            return self._not_found()
        start, end = 0, len(data) - 1
        ranged = self.headers.get("Range")
        if ranged:
            first, _, last = ranged.split("=", 1)[1].partition("-")
            start, end = int(first), min(int(last) if last else len(data) - 1, len(data) - 1)
            if body and path in self.drop_once:  # the connection drops before any answer
                self.drop_once.discard(path)
                self.dropped.append(path)
                self.close_connection = True
                self.connection.shutdown(2)
                return
        chunk = data[start : end + 1]
        self.send_response(206 if ranged else 200)
        self.send_header("X-Repo-Commit", COMMIT)
        bad = path.rsplit("/", 1)[-1] in self.bad_etag
        self.send_header("ETag", f'"{hashlib.sha256(data if not bad else b"something else").hexdigest()}"')
        self.send_header("Accept-Ranges", "bytes")
        if ranged:
            self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        self.send_header("Content-Length", str(len(chunk)))
        self.end_headers()
        if body:
            self.wfile.write(chunk)

    def do_HEAD(self):  # noqa: N802
        self._serve(False)

    def do_GET(self):  # noqa: N802
        self._serve(True)

    def do_POST(self):  # noqa: N802
        path = urlparse(self.path).path.strip("/")
        parts = path.split("/")
        uploads = path in ("api/repos/create", "api/validate-yaml") or (
            len(parts) >= 5 and parts[:2] == ["api", "models"] and parts[4] in ("preupload", "commit"))
        if not uploads:
            return self._serve(True)  # dataset API calls such as paths-info
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.tokens.append(self.headers.get("Authorization"))
        if path == "api/repos/create":
            request = json.loads(body)
            repo = "/".join(p for p in (request.get("organization"), request["name"]) if p)
            return self._json({"url": f"http://{self.headers['Host']}/{repo}", "name": repo})
        if path == "api/validate-yaml":
            return self._json({"errors": [], "warnings": []})
        if parts[4] == "preupload":
            return self._json({"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                         for f in json.loads(body)["files"]]})
        repo, message, paths = f"{parts[2]}/{parts[3]}", "", []
        for line in body.decode().splitlines():
            item = json.loads(line)
            if item["key"] == "header":
                message = item["value"].get("summary", "")
            elif item["key"] == "file":
                value = item["value"]
                self.files[(repo, value["path"])] = base64.b64decode(value["content"])
                paths.append(value["path"])
        self.commits.append((repo, message, paths))
        oid = hashlib.sha1(body).hexdigest()
        return self._json({"commitUrl": f"http://{self.headers['Host']}/{repo}/commit/{oid}",
                           "commitOid": oid, "pullRequestUrl": None})

    def log_message(self, *args):
        pass


def start(handler=Hub):
    """Serve `handler` on a free loopback port; returns (server, endpoint URL). server.shutdown() stops it."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"
