"""A stand-in for the Hugging Face Hub on 127.0.0.1, answering the requests huggingface_hub (and
transformers through it) makes when HF_ENDPOINT points at it.

Downloads: HEAD/GET /{repo}/resolve/{revision}/{path} from `Hub.files`, {(repo_id, path): bytes},
with the SHA-256 ETag the real hub gives large files (`Hub.bad_etag`: file names whose ETag is
wrong, to test checksums). A repository without any file answers RepoNotFound.
Uploads: POST /api/repos/create, /api/validate-yaml, /api/models/{repo}/preupload/{revision}
(every file "regular", so the content comes inline in the commit) and
/api/models/{repo}/commit/{revision} (NDJSON), which stores the files in `Hub.files`; the
Authorization headers seen are kept in `Hub.tokens`.
"""

import base64
import hashlib
import json
from http.server import BaseHTTPRequestHandler


class Hub(BaseHTTPRequestHandler):
    files: dict = {}
    bad_etag: set = set()
    tokens: list = []
    commits: list = []  # (repo_id, commit message, [paths]) of every commit received

    def _serve(self, body: bool):
        parts = self.path.split("?")[0].strip("/").split("/")
        data = None
        if len(parts) >= 5 and parts[2] == "resolve":
            repo = "/".join(parts[:2])
            data = self.files.get((repo, "/".join(parts[4:])))
            if data is None and not any(r == repo for r, _ in self.files):
                return self._json(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
        if data is None:
            self.send_response(404)
            self.send_header("X-Error-Code", "EntryNotFound")
            self.end_headers()
            return
        digest = hashlib.sha256(data).hexdigest()
        if parts[-1] in self.bad_etag:
            digest = hashlib.sha256(b"something else").hexdigest()
        self.send_response(200)
        self.send_header("X-Repo-Commit", "c" * 40)
        self.send_header("ETag", f'"{digest}"')
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)

    def _json(self, status: int, payload, headers=None):
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_HEAD(self):  # noqa: N802
        self._serve(False)

    def do_GET(self):  # noqa: N802
        self._serve(True)

    def do_POST(self):  # noqa: N802
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.tokens.append(self.headers.get("Authorization"))
        path = self.path.split("?")[0].strip("/")
        parts = path.split("/")
        if path == "api/repos/create":
            request = json.loads(body)
            repo = "/".join(p for p in (request.get("organization"), request["name"]) if p)
            return self._json(200, {"url": f"http://{self.headers['Host']}/{repo}", "name": repo})
        if path == "api/validate-yaml":
            return self._json(200, {"errors": [], "warnings": []})
        if len(parts) >= 5 and parts[0] == "api" and parts[1] == "models" and parts[4] == "preupload":
            files = json.loads(body)["files"]
            return self._json(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                              for f in files]})
        if len(parts) >= 5 and parts[0] == "api" and parts[1] == "models" and parts[4] == "commit":
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
            return self._json(200, {"commitUrl": f"http://{self.headers['Host']}/{repo}/commit/{oid}",
                                    "commitOid": oid, "pullRequestUrl": None})
        self._json(404, {"error": f"not served here: POST /{path}"})

    def log_message(self, *args):
        pass
