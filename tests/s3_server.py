"""A real S3-compatible server for tests: moto in server mode on 127.0.0.1, in a subprocess.

Clients reach it through the standard AWS environment (AWS_ENDPOINT_URL and test keys),
exactly as a MinIO or Ceph endpoint is reached in production, so every process the test
starts (Ray workers, `ray job submit` drivers, the trainer) talks to the same bucket.

`FaultProxy` sits between the client and the server and answers the first `fail_first`
connections with an HTTP 500 (S3 "InternalError") before forwarding the rest unchanged:
a storage that fails transiently, on the wire, for the real s3fs/botocore client.

Usage (pytest):  from s3_server import s3_server  # session fixture; yields an S3Server
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from contextlib import contextmanager
from typing import Iterator

import pytest

START_TIMEOUT_S = 60.0
TEST_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",  # no instance-metadata probing on a laptop
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Server:
    """moto_server in a child process; stop() (or the context manager) always ends it."""

    def __init__(self) -> None:
        self.port = free_port()
        self.endpoint_url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        # the server logs every request: to a file, never to a pipe nobody drains (a full pipe blocks it)
        self.log = tempfile.NamedTemporaryFile(prefix="moto-", suffix=".log", delete=False)

    @property
    def env(self) -> dict[str, str]:
        return {**TEST_ENV, "AWS_ENDPOINT_URL": self.endpoint_url}

    def start(self) -> "S3Server":
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from moto.server import main; main()", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, **TEST_ENV})
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto_server exited with {self.proc.returncode}: {self._log_tail()}")
            try:
                urllib.request.urlopen(f"{self.endpoint_url}/moto-api/", timeout=1).read()
                return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"moto_server did not answer on {self.endpoint_url} within {START_TIMEOUT_S} s")

    def reset(self) -> None:
        """Delete every bucket and object (moto's own reset endpoint)."""
        urllib.request.urlopen(urllib.request.Request(f"{self.endpoint_url}/moto-api/reset", method="POST"),
                               timeout=10).read()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()
        if os.path.exists(self.log.name):
            os.remove(self.log.name)

    def _log_tail(self) -> str:
        with open(self.log.name, "rb") as f:
            return f.read()[-3000:].decode(errors="replace")

    def __enter__(self) -> "S3Server":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


_FAIL_RESPONSE = (b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/xml\r\nConnection: close\r\n"
                  b"Content-Length: %d\r\n\r\n%s")
_FAIL_BODY = (b"<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>InternalError</Code>"
              b"<Message>injected transient failure</Message></Error>")


class FaultProxy:
    """TCP proxy to `target_port` whose first `fail_first` connections get an S3 500 and are closed."""

    def __init__(self, target_port: int, fail_first: int) -> None:
        self.target_port, self.fail_first = target_port, fail_first
        self.connections = 0
        self.failed = 0
        self._lock = threading.Lock()
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self.port = self._sock.getsockname()[1]
        self.endpoint_url = f"http://127.0.0.1:{self.port}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        self._sock.settimeout(0.2)
        while not self._stop.is_set():
            try:
                client, _ = self._sock.accept()
            except OSError:
                continue
            with self._lock:
                self.connections += 1
                fail = self.failed < self.fail_first
                if fail:
                    self.failed += 1
            threading.Thread(target=self._fail if fail else self._pipe, args=(client,), daemon=True).start()

    @staticmethod
    def _fail(client: socket.socket) -> None:
        with client:
            client.settimeout(5)
            try:
                client.recv(65536)  # the request head; the body (if any) is discarded with the connection
                client.sendall(_FAIL_RESPONSE % (len(_FAIL_BODY), _FAIL_BODY))
            except OSError:
                pass

    def _pipe(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=30)
        except OSError:
            client.close()
            return

        def copy(src: socket.socket, dst: socket.socket) -> None:
            try:
                while data := src.recv(65536):
                    dst.sendall(data)
            except OSError:
                pass
            finally:
                for s in (src, dst):
                    try:
                        s.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass

        t = threading.Thread(target=copy, args=(upstream, client), daemon=True)
        t.start()
        copy(client, upstream)
        t.join(30)
        client.close()
        upstream.close()

    def __enter__(self) -> "FaultProxy":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close()


@contextmanager
def aws_env(env: dict[str, str]) -> Iterator[None]:
    """Set AWS_* variables for this process and forget cached s3fs clients that used the old ones."""
    import fsspec
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    fsspec.get_filesystem_class("s3").clear_instance_cache()
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        fsspec.get_filesystem_class("s3").clear_instance_cache()


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """One moto server for the session, reachable by this process and its children via the env."""
    with S3Server() as server, aws_env(server.env):
        yield server
