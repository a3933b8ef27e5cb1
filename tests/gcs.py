"""A local Google Cloud Storage emulator for the tests (`gcp-storage-emulator`, in memory),
started on 127.0.0.1 and stopped after, with the environment that points every client at it:
gcsfs and google-cloud-storage (STORAGE_EMULATOR_HOST; tensorboardX writes through the
latter) and TensorStore, under Orbax (TENSORSTORE_GCS_HTTP_URL). Subprocesses inherit it."""

import contextlib
import logging
import os
import socket
import subprocess
import sys
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
        [sys.executable, "-m", "gcp_storage_emulator", "start", "--host", "127.0.0.1",
         "--port", str(port), "--in-memory", "--default-bucket", BUCKET],
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
