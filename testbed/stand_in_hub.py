"""A stand-in for the Hugging Face hub on 127.0.0.1: the routes huggingface_hub downloads through, for tests.

It serves model directories as repos (``/api/models/{repo}/revision/{revision}``
and ``/tree/`` for the commit and the file list, ``/{repo}/resolve/{revision}/{file}`` for each file, with
the headers huggingface_hub reads: ``X-Repo-Commit``, ``ETag``, sizes, ranges),
answers an unknown repo as the hub does (404, ``X-Error-Code: RepoNotFound``),
and can misbehave on purpose: drop a file's connection half-way once (a resume
must follow), or pace its bytes (a download slow enough to watch).  Point
huggingface_hub at it with ``HF_ENDPOINT``.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote

__all__ = ["StandInHub", "stand_in_hub"]

COMMIT = "0123456789abcdef0123456789abcdef01234567"
_RANGE = re.compile(r"bytes=(\d+)-(\d*)")


@dataclass
class StandInHub:
    """The repos served (id -> directory), what to do to them, and what was asked."""

    repos: dict[str, Path]
    drop_once: set[str] = field(default_factory=set)  # file names whose first GET stops half-way
    seconds_per_chunk: float = 0.0  # pacing: a pause after every 64 KiB
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)  # method, path, Range header
    url: str = ""

    def files(self, repo: str) -> list[Path]:
        root = self.repos[repo]
        return sorted(path for path in root.rglob("*") if path.is_file())


def _handler(hub: StandInHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            pass

        def _refuse(self, status: int, code: str) -> None:
            body = json.dumps({"error": code}).encode()
            self.send_response(status)
            self.send_header("X-Error-Code", code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _repo_info(self, repo: str) -> None:
            files = [path.relative_to(hub.repos[repo]).as_posix() for path in hub.files(repo)]
            body = json.dumps({"id": repo, "modelId": repo, "sha": COMMIT, "private": False,
                               "siblings": [{"rfilename": name} for name in files]}).encode()  # fmt: skip
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _tree(self, repo: str) -> None:
            entries = []
            for path in hub.files(repo):
                data = path.read_bytes()
                entry = {"type": "file", "path": path.relative_to(hub.repos[repo]).as_posix(), "size": len(data),
                         "oid": hashlib.sha1(data).hexdigest()}  # fmt: skip
                if path.suffix == ".safetensors":
                    entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
                entries.append(entry)
            body = json.dumps(entries).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _file(self, repo: str, name: str, head: bool) -> None:
            path = hub.repos[repo] / name
            if not path.is_file():
                self._refuse(404, "EntryNotFound")
                return
            data = path.read_bytes()
            etag = f'"{hashlib.sha256(data).hexdigest()}"'
            start, end = 0, len(data)
            asked = _RANGE.match(self.headers.get("Range", ""))
            if asked is not None and not head:
                start = int(asked.group(1))
                end = int(asked.group(2)) + 1 if asked.group(2) else len(data)
            self.send_response(206 if asked is not None and not head else 200)
            self.send_header("X-Repo-Commit", COMMIT)
            self.send_header("ETag", etag)
            self.send_header("X-Linked-Etag", etag)
            self.send_header("X-Linked-Size", str(len(data)))
            self.send_header("Content-Length", str(end - start))
            if asked is not None and not head:
                self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
            self.send_header("Accept-Ranges", "bytes")
            self.end_headers()
            if head:
                return
            part = data[start:end]
            if name in hub.drop_once:
                hub.drop_once.discard(name)
                self.wfile.write(part[: len(part) // 2])
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(2)
                return
            for offset in range(0, len(part), 65536):
                self.wfile.write(part[offset : offset + 65536])
                if hub.seconds_per_chunk:
                    time.sleep(hub.seconds_per_chunk)

        def _route(self, head: bool) -> None:
            path = unquote(self.path.split("?", 1)[0])
            hub.requests.append((self.command, path, self.headers.get("Range")))
            tree = re.fullmatch(r"/api/models/(.+?)/tree/[^/]+(?:/.*)?", path)
            if tree is not None:
                self._tree(tree.group(1)) if tree.group(1) in hub.repos else self._refuse(404, "RepoNotFound")
                return
            info = re.fullmatch(r"/api/models/(.+?)/revision/[^/]+", path)
            if info is not None:
                repo = info.group(1)
                self._repo_info(repo) if repo in hub.repos else self._refuse(404, "RepoNotFound")
                return
            resolved = re.fullmatch(r"/(.+?)/resolve/[^/]+/(.+)", path)
            if resolved is not None and resolved.group(1) in hub.repos:
                self._file(resolved.group(1), resolved.group(2), head)
                return
            self._refuse(404, "RepoNotFound")

        def do_GET(self) -> None:
            self._route(head=False)

        def do_HEAD(self) -> None:
            self._route(head=True)

    return Handler


@contextmanager
def stand_in_hub(repos: dict[str, Path]) -> Iterator[StandInHub]:
    """The hub on a free port of 127.0.0.1 for as long as the block runs; its ``url`` is the ``HF_ENDPOINT``."""
    hub = StandInHub(repos)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(hub))
    hub.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, name="stand-in-hub", daemon=True)
    thread.start()
    try:
        yield hub
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
