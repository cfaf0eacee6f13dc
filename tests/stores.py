"""The local S3-compatible servers the object-storage tests and the benchmark
start: moto (one Python process; does not check signatures unless told to)
and SeaweedFS (`weed mini`: a real store that checks SigV4). Each listens on
free loopback ports only and is always stopped by its owner."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
from pathlib import Path

import boto3
import botocore.config

from helpers import wait_until

VENV_BIN = Path(__file__).resolve().parent.parent / ".venv" / "bin"
MOTO = VENV_BIN / "moto_server"
WEED = VENV_BIN / "weed"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Store:
    """A store process on a free loopback port, with one user (key_id,
    secret) that may do everything."""

    kind = ""

    def __init__(self, directory: Path, name: str, key_id: str, secret: str):
        self.key_id = key_id
        self.secret = secret
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.log = open(directory / f"{self.kind}-{name}.log", "wb")
        self.process: subprocess.Popen | None = None

    def _wait(self) -> None:
        wait_until(self._answers, timeout=90)

    def _answers(self) -> bool:
        if self.process.poll() is not None:
            raise RuntimeError(f"the {self.kind} server exited; see {self.log.name}")
        return self._ready()

    def _ready(self) -> bool:
        # A connection is enough for moto, and sends no request (a moto that
        # checks signatures counts its first unchecked requests).
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return True
        except OSError:
            return False

    def client(self, key_id: str | None = None, secret: str | None = None, service: str = "s3"):
        return boto3.client(
            service, endpoint_url=self.endpoint, region_name="us-east-1",
            aws_access_key_id=key_id or self.key_id, aws_secret_access_key=secret or self.secret,
            config=botocore.config.Config(retries={"max_attempts": 1}),
        )

    def kill(self) -> None:
        """Ends the server at once, as a crash would."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process is not None:
            self.kill()
        self.log.close()


class MotoStore(Store):
    kind = "moto"

    def __init__(self, directory: Path, name: str, key_id: str, secret: str,
                 environment: dict[str, str] | None = None):
        super().__init__(directory, name, key_id, secret)
        self.process = subprocess.Popen(
            [str(MOTO), "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=self.log, stderr=subprocess.STDOUT,
            env=dict(os.environ, **(environment or {})),
        )
        try:
            self._wait()
        except BaseException:
            self.stop()
            raise


class SeaweedStore(Store):
    """`weed mini`: master, volume, filer and S3 gateway in one process, with
    its data in a fresh directory. Every one of its listeners gets a free
    loopback port (by default some bind 0.0.0.0); the parts it does not need
    (admin UI, WebDAV, Iceberg and Lance catalogues) are off, and so is its
    creating buckets on upload. `identities`
    are more users, (name, key id, secret, actions), beside the main one."""

    kind = "seaweedfs"

    def _ready(self) -> bool:
        # Its S3 port accepts connections before the filer behind it serves.
        try:
            self.client().list_buckets()
            return True
        except Exception:  # refused, reset, or an error while it starts
            return False

    def __init__(self, directory: Path, name: str, key_id: str, secret: str,
                 identities: list[tuple[str, str, str, list[str]]] = ()):
        super().__init__(directory, name, key_id, secret)
        self.data = Path(tempfile.mkdtemp(prefix=f"pse-weed-{name}.", dir="/tmp"))
        users = [("main", key_id, secret, ["Admin", "Read", "Write", "List", "Tagging"]), *identities]
        config = self.data / "s3.json"
        config.write_text(json.dumps({"identities": [
            {"name": user, "credentials": [{"accessKey": k, "secretKey": s}], "actions": actions}
            for user, k, s, actions in users]}))
        (self.data / "store").mkdir()
        self.ports = ports = {flag: free_port() for flag in (
            "master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
            "filer.port.grpc", "s3.port.grpc", "admin.port", "admin.port.grpc")}
        command = [str(WEED), "mini", f"-dir={self.data / 'store'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                   f"-s3.port={self.port}", f"-s3.config={config}", "-admin.ui=false", "-webdav=false",
                   "-s3.port.iceberg=0", "-s3.port.lance=0",
                   # As S3: a PUT into a bucket that does not exist is NoSuchBucket.
                   "-s3.autoCreateBucket=false",
                   *(f"-{flag}={port}" for flag, port in ports.items())]
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        try:
            self._wait()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        super().stop()
        shutil.rmtree(self.data, ignore_errors=True)
        # Killed, it leaves a Unix socket per service in /tmp, named by the
        # service's port: ours, so ours to remove.
        for port in (self.port, *self.ports.values()):
            for sock in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                sock.unlink(missing_ok=True)


def start_store(kind: str, directory: Path, name: str, key_id: str, secret: str) -> Store:
    if kind == "moto":
        return MotoStore(directory, name, key_id, secret)
    if kind == "seaweedfs":
        return SeaweedStore(directory, name, key_id, secret)
    raise ValueError(kind)


@contextlib.contextmanager
def running_store(kind: str, directory: Path, name: str, bucket: str, secret: str):
    """A store of `kind` with user "testing" and the bucket `bucket`,
    stopped when the block ends."""
    s = start_store(kind, directory, name, "testing", secret)
    try:
        s.client().create_bucket(Bucket=bucket)
        yield s
    finally:
        s.stop()


def store_environment(endpoint: str, secret: str) -> dict[str, str]:
    """A server's environment that reaches the store at `endpoint` as the
    user "testing"."""
    return {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": secret,
        "AWS_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ALLOW_HTTP": "true",
    }
