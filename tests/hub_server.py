"""A stand-in for the Hugging Face Hub (and for plain download sites) on 127.0.0.1.

It answers huggingface_hub's HEAD and GET of /{repo}/resolve/{revision}/{path} for models and
/datasets/{repo}/resolve/{revision}/{path} for datasets, with the SHA-256 ETag the hub gives, and
GET /mirror/{host}/{path} for files whose home is an ordinary URL (gpt2train.tasks.data's
GPT2TRAIN_TASK_MIRROR). Files are keyed (repo, path), with "datasets/" before a dataset's repo,
or ("mirror", "host/path").
"""

from __future__ import annotations

import hashlib
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Hub(BaseHTTPRequestHandler):
    files: dict = {}
    bad_etag: set = set()  # file names served with a wrong hash

    def _lookup(self):
        parts = self.path.split("?")[0].strip("/").split("/")
        if parts[0] == "mirror":
            return self.files.get(("mirror", "/".join(parts[1:])))
        repo_parts = 3 if parts[0] == "datasets" else 2
        if len(parts) >= repo_parts + 3 and parts[repo_parts] == "resolve":
            return self.files.get(("/".join(parts[:repo_parts]), "/".join(parts[repo_parts + 2:])))
        return None

    def _serve(self, body: bool):
        data = self._lookup()
        if data is None:
            self.send_response(404)
            self.send_header("X-Error-Code", "EntryNotFound")
            self.end_headers()
            return
        digest = hashlib.sha256(data).hexdigest()
        if self.path.split("?")[0].rsplit("/", 1)[-1] in self.bad_etag:
            digest = hashlib.sha256(b"something else").hexdigest()
        self.send_response(200)
        self.send_header("X-Repo-Commit", "c" * 40)
        self.send_header("ETag", f'"{digest}"')
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)

    def do_HEAD(self):  # noqa: N802
        self._serve(False)

    def do_GET(self):  # noqa: N802
        self._serve(True)

    def log_message(self, *args):
        pass


def start(handler=Hub) -> tuple[ThreadingHTTPServer, str]:
    """A running server for `handler` on a free port, and its base URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"
