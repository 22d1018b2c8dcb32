"""An S3 endpoint on 127.0.0.1 for the tests: moto's server in a process of its own, on a free port.

A test module takes the module-scoped fixture `s3_endpoint` by importing it:

    from tests.s3server import s3_endpoint  # noqa: F401

For the module's duration this process's environment points boto (AWS_ENDPOINT_URL) and fsspec
(FSSPEC_S3_ENDPOINT_URL) at the server with the credentials "foo"/"foo", so `s3://` URLs work in
this process and in everything it starts (`bkd` subprocesses, dask workers, DDP ranks, dvc);
`endpoint.env` holds the same variables for an explicit subprocess environment. Each module gets
its own server and an empty bucket, so modules on different xdist workers never share one.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Iterator

import pytest

BUCKET = "bkd-test"

# Run in the server's process: moto's threaded server on a port the OS picks, the port on stdout,
# served until stdin closes (so the server also goes when the test process dies).
_SERVE = """
import logging, sys
logging.getLogger("werkzeug").setLevel(logging.ERROR)
from moto.server import ThreadedMotoServer
server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
print(server.get_host_and_port()[1], flush=True)
sys.stdin.read()
server.stop()
"""


@dataclass
class S3Endpoint:
    url: str  # http://127.0.0.1:PORT
    bucket: str
    env: dict[str, str] = field(default_factory=dict)  # the variables that point boto and fsspec at it
    _lister: object = field(default=None, init=False, repr=False)  # the filesystem `keys` lists with

    def uri(self, key: str) -> str:
        """`s3://BUCKET/KEY`."""
        return f"s3://{self.bucket}/{key.lstrip('/')}"

    def fs(self):
        """A new s3fs filesystem on the endpoint: its own client and no cached listings."""
        import s3fs

        return s3fs.S3FileSystem(endpoint_url=self.url, key="foo", secret="foo", skip_instance_cache=True,
                                 use_listings_cache=False)

    def keys(self, prefix: str = "") -> set[str]:
        """Every object key in the bucket under `prefix` (a folder, relative to the bucket), listed now."""
        if self._lister is None:
            self._lister = self.fs()
        fs = self._lister
        root = f"{self.bucket}/{prefix}".rstrip("/")
        if not fs.exists(root):
            return set()
        return {path[len(self.bucket) + 1:] for path in fs.find(root)}


@contextlib.contextmanager
def moto_server() -> Iterator[str]:
    """moto's S3 server on 127.0.0.1 in a subprocess; yields its URL."""
    proc = subprocess.Popen([sys.executable, "-c", _SERVE], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline().strip()
        if not line.isdigit():
            raise RuntimeError(f"moto's server did not start (exit {proc.poll()})")
        yield f"http://127.0.0.1:{line}"
    finally:
        with contextlib.suppress(OSError):
            proc.stdin.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _clear_s3fs_instances() -> None:
    """Forget s3fs filesystems made so far: each holds a client bound to the endpoint it was made for."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()


@contextlib.contextmanager
def s3_environment(bucket: str = BUCKET) -> Iterator[S3Endpoint]:
    """A moto server with an empty `bucket`, and this process's environment pointed at it (restored after)."""
    import fsspec.config

    with moto_server() as url, pytest.MonkeyPatch.context() as patch:
        env = {"AWS_ACCESS_KEY_ID": "foo", "AWS_SECRET_ACCESS_KEY": "foo", "AWS_DEFAULT_REGION": "us-east-1",
               "AWS_ENDPOINT_URL": url,  # botocore's (so aiobotocore's and s3fs's) endpoint, read per client
               "FSSPEC_S3_ENDPOINT_URL": url}  # fsspec's config, read once when fsspec is imported
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
            patch.delenv(name, raising=False)
        for name, value in env.items():
            patch.setenv(name, value)
        # this process imported fsspec already: its config gets the endpoint the variable would have given it
        patch.setitem(fsspec.config.conf, "s3", {**fsspec.config.conf.get("s3", {}), "endpoint_url": url})
        _clear_s3fs_instances()
        endpoint = S3Endpoint(url, bucket, env)
        endpoint.fs().mkdir(bucket)
        try:
            yield endpoint
        finally:
            _clear_s3fs_instances()


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[S3Endpoint]:
    """An S3 endpoint on 127.0.0.1 (moto's server) with an empty bucket, for the module's tests."""
    with s3_environment() as endpoint:
        yield endpoint
