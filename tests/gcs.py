"""A local Google Cloud Storage emulator for the tests (`gcp-storage-emulator`, in memory),
started on 127.0.0.1 and stopped after, with the environment that points every client at it:
gcsfs (STORAGE_EMULATOR_HOST) and TensorStore, under Orbax (TENSORSTORE_GCS_HTTP_URL).
Subprocesses inherit it.

The emulator is served by `serve` below rather than its own command, for two reasons: its
server is a single-threaded `http.server.HTTPServer` with no socket timeout, so one client
connection that stalls (TensorStore opens many at once) blocks every other request for good;
and in memory it still rewrites one JSON document of every object's metadata at each write
(quadratic in a run's thousands of checkpoint objects). Here: a threading server whose
requests are handled one at a time under a lock (the emulator's state is not thread-safe),
a per-connection timeout, and no metadata document (nothing in memory outlives the process).
And its multipart-upload parser (Python's email parser) takes a file's last byte for part of
the line end when it is a carriage return (gcsfs ends its multipart lines with a bare LF, so
b"abc\r" was stored as b"abc": one small upload in 256 damaged, which the checked copies of
model directories caught): multipart bodies are split here byte-exactly. And it implements
no preconditions: `_preconditions` adds `ifGenerationMatch` / `ifGenerationNotMatch` to
object reads and single-request writes (412 / 304 as GCS answers), deletes of one
`generation` (404 once replaced) and the `x-goog-generation` header of downloads, which
TensorStore (OCDBT's manifest commits) and gcsfs's create-only uploads (lease locks) rely
on. Resumable uploads (gcsfs, files over its block size) stay
unconditional.
"""

import contextlib
import email.message
import functools
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid

BUCKET = "bucket"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def emulator():
    """Yields the emulator's URL with the environment set; everything is restored after."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while True:
        try:
            urllib.request.urlopen(f"{url}/storage/v1/b/{BUCKET}", timeout=2).read()
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise RuntimeError("the GCS emulator did not start") from None
            time.sleep(0.1)
    env = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
           "GOOGLE_CLOUD_PROJECT": "test", "GCE_METADATA_HOST": "127.0.0.1:9",
           "NO_GCE_CHECK": "true"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)

    # gcsfs asks for credentials to tell a bucket's kind, and warns when there are none.
    logging.getLogger("gcsfs").setLevel(logging.ERROR)
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def fresh_prefix() -> str:
    """A new, empty gs:// prefix in the emulator's bucket."""
    return f"gs://{BUCKET}/{uuid.uuid4().hex[:10]}"


def objects(prefix: str) -> list[str]:
    """Every object under gs:// prefix, relative to it."""
    from ldot_jax.core import paths
    return paths.walk_files(prefix)


def serve(port: int) -> None:
    """Serves an in-memory emulator with bucket BUCKET on 127.0.0.1:`port` until killed."""
    from http import server as http_server

    from gcp_storage_emulator import server as emulator
    from gcp_storage_emulator import storage as emulator_storage
    from gcp_storage_emulator.handlers.buckets import create_bucket

    emulator_storage.Storage._write_config_to_file = lambda self: None
    emulator._read_data = _exact_multipart(emulator._read_data, emulator)
    state = emulator_storage.Storage(use_memory_fs=True)
    create_bucket(BUCKET, state)
    for _, table in emulator.HANDLERS:
        for method, handler in list(table.items()):
            table[method] = _preconditions(handler, state)
    lock = threading.Lock()

    class Handler(emulator.RequestHandler):
        timeout = 60  # seconds a connection may stall before it is dropped

        def log_message(self, format, *args):
            pass

    def one_at_a_time(method):
        @functools.wraps(method)
        def handle(self):
            with lock:
                method(self)
        return handle

    for name in ("do_GET", "do_POST", "do_PUT", "do_DELETE", "do_PATCH"):
        setattr(Handler, name, one_at_a_time(getattr(emulator.RequestHandler, name)))

    httpd = http_server.ThreadingHTTPServer(("127.0.0.1", port),
                                            functools.partial(Handler, state))
    httpd.daemon_threads = True
    httpd.serve_forever()


def _exact_multipart(read_data, emulator):
    """The emulator's request-body reader, with multipart/related uploads (a JSON part, then
    the file) split on the boundary byte-exactly."""

    def read(handler, query):
        content_type = handler.headers.get("Content-Type") or ""
        if not content_type.startswith("multipart/related"):
            return read_data(handler, query)
        header = email.message.Message()
        header["Content-Type"] = content_type
        boundary = b"--" + header.get_param("boundary").encode()
        raw = emulator._decode_raw_data(emulator._read_raw_data(handler), handler)
        parts = []
        for part in raw.split(boundary)[1:-1]:
            # Each part: a line end, headers, a blank line, the body, a line end. gcsfs ends
            # lines with LF, RFC 2046 (and google-cloud-storage) with CRLF: the part's first
            # line end says which, so a body's own last byte is never taken for one.
            newline = b"\r\n" if part.startswith(b"\r\n") else b"\n"
            head, body = part[len(newline):].split(newline * 2, 1)
            kind = email.message.Message()
            for line in head.decode().split(newline.decode()):
                name, _, value = line.partition(":")
                kind[name.strip()] = value.strip()
            parts.append((kind.get_content_type(), body[:-len(newline)]))
        (_, meta), (file_type, content) = parts
        return {"meta": json.loads(meta), "content": content, "content-type": file_type}

    return read


def _preconditions(handler, state):
    """`handler` (an emulator route) with GCS's generation preconditions on its object."""
    from http import HTTPStatus

    from gcp_storage_emulator.exceptions import NotFound

    def generation(request) -> str:
        bucket = request.params.get("bucket_name")
        name = request.params.get("object_id")
        if name is None:  # an upload: the name is a query parameter or in the metadata part
            name = (request.query.get("name") or [None])[0]
            if name is None and isinstance(request.data, dict):
                name = (request.data.get("meta") or {}).get("name")
        try:
            return str(state.get_file_obj(bucket, name)["generation"])
        except (NotFound, KeyError, TypeError):
            return "0"  # GCS: ifGenerationMatch=0 means "no live object"

    def handle(request, response, storage, *args, **kwargs):
        exact = (request.query.get("generation") or [None])[0]
        if request.method == "DELETE" and exact is not None and exact != generation(request):
            response.status = HTTPStatus.NOT_FOUND  # that generation is no longer live
            return response.json({"error": {"code": 404, "message": "No such object"}})
        match = (request.query.get("ifGenerationMatch") or [None])[0]
        not_match = (request.query.get("ifGenerationNotMatch") or [None])[0]
        if match is not None or not_match is not None:
            current = generation(request)
            if match is not None and match != current:
                response.status = HTTPStatus.PRECONDITION_FAILED
                return response.json({"error": {"code": 412, "message": "conditionNotMet"}})
            if not_match is not None and not_match == current:
                if request.method == "GET":
                    response.status = HTTPStatus.NOT_MODIFIED
                    return None
                response.status = HTTPStatus.PRECONDITION_FAILED
                return response.json({"error": {"code": 412, "message": "conditionNotMet"}})
        out = handler(request, response, storage, *args, **kwargs)
        if request.method == "GET" and "object_id" in request.params:
            current = generation(request)
            if current != "0":
                response["x-goog-generation"] = current
                response["x-goog-metageneration"] = "1"
        return out

    return handle


if __name__ == "__main__":
    serve(int(sys.argv[1]))
