"""A real S3 API on loopback for the tests: moto's server behind a fault-injecting WSGI middleware.

`S3Server` runs moto's `ThreadedMotoServer` on 127.0.0.1 at a free port, in a daemon thread (it
cannot outlive the test process). Clients reach it the way they reach any S3-compatible store:
`AWS_ENDPOINT_URL` and credentials in the environment (the `s3` fixture in conftest.py sets them).

`fail(key_part, mode, times)` makes the next `times` requests whose path contains `key_part` fail:
- "drop": the connection is closed before any response (a dropped connection),
- "503": the answer is S3's ServiceUnavailable,
- "truncate": the status, the headers and half the body are sent, then the connection is closed.
`requests(key_part)` counts the requests that reached the server for paths containing `key_part`.
"""

from __future__ import annotations

import socket
import threading
from dataclasses import dataclass

from moto.server import ThreadedMotoServer

SERVICE_UNAVAILABLE = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>ServiceUnavailable</Code>'
    b"<Message>injected by the test server</Message></Error>"
)


@dataclass
class Fault:
    key_part: str
    mode: str
    times: int | None  # None: every matching request
    method: str | None = None
    hits: int = 0


class FaultInjector:
    """WSGI middleware: applies the first matching `Fault` to a request, else passes it to `app`."""

    MODES = ("drop", "503", "truncate")

    def __init__(self, app):
        self.app = app
        self.faults: list[Fault] = []
        self.log: list[tuple[str, str]] = []  # (method, path) of every request
        self._lock = threading.Lock()

    def add(self, fault: Fault) -> Fault:
        if fault.mode not in self.MODES:
            raise ValueError(f"unknown fault mode {fault.mode!r}; choose one of {self.MODES}")
        with self._lock:
            self.faults.append(fault)
        return fault

    def clear(self) -> None:
        with self._lock:
            self.faults.clear()
            self.log.clear()

    def _take(self, method: str, path: str) -> Fault | None:
        with self._lock:
            self.log.append((method, path))
            for f in self.faults:
                used_up = f.times is not None and f.hits >= f.times
                if not used_up and f.key_part in path and f.method in (None, method):
                    f.hits += 1
                    return f
        return None

    def __call__(self, environ, start_response):
        fault = self._take(environ["REQUEST_METHOD"], environ.get("PATH_INFO", ""))
        if fault is None:
            return self.app(environ, start_response)
        if fault.mode == "503":
            start_response(
                "503 Service Unavailable",
                [("Content-Type", "application/xml"), ("Content-Length", str(len(SERVICE_UNAVAILABLE)))],
            )
            return [SERVICE_UNAVAILABLE]
        if fault.mode == "drop":
            _close(environ)
            start_response("500 Dropped", [])  # werkzeug's write of these headers meets a closed socket
            return []
        return self._truncated(environ, start_response)

    def _truncated(self, environ, start_response):
        status_headers = []
        body = b"".join(
            self.app(environ, lambda status, headers, exc_info=None: status_headers.append((status, headers)))
        )
        start_response(*status_headers[0])
        yield body[: len(body) // 2]
        _close(environ)


def _close(environ) -> None:
    try:
        environ["werkzeug.socket"].shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # the client went first


class S3Server:
    """moto's S3 server on 127.0.0.1 at a free port, with a `FaultInjector` in front."""

    def __init__(self):
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.faults: FaultInjector | None = None

    def start(self) -> S3Server:
        self._server.start()
        # moto offers no middleware hook: wrap the WSGI app its werkzeug server calls for every request
        wsgi = self._server._server
        self.faults = wsgi.app = FaultInjector(wsgi.app)
        return self

    def stop(self) -> None:
        self._server.stop()

    @property
    def endpoint(self) -> str:
        host, port = self._server.get_host_and_port()
        return f"http://{host}:{port}"

    def fail(
        self, key_part: str, mode: str = "drop", times: int | None = 1, method: str | None = None
    ) -> Fault:
        """Fail the next `times` requests (None: all) whose path contains `key_part` (and whose HTTP
        method is `method`, when given)."""
        return self.faults.add(Fault(key_part, mode, times, method))

    def requests(self, key_part: str, method: str | None = None) -> int:
        """How many requests for a path containing `key_part` reached the server (faulted ones too)."""
        with self.faults._lock:
            return sum(key_part in p and method in (None, m) for m, p in self.faults.log)


@dataclass
class S3Bucket:
    """A bucket on an `S3Server`: `url` is `s3://NAME`; `fail` and `requests` are the server's."""

    server: S3Server
    name: str

    @property
    def url(self) -> str:
        return f"s3://{self.name}"

    def fail(
        self, key_part: str, mode: str = "drop", times: int | None = 1, method: str | None = None
    ) -> Fault:
        return self.server.fail(key_part, mode, times, method)

    def requests(self, key_part: str, method: str | None = None) -> int:
        return self.server.requests(key_part, method)


def s3_environment(endpoint: str, home) -> dict[str, str]:
    """The environment that points any S3 client at `endpoint` with fake credentials, away from the
    user's own configuration (`home` holds empty AWS config files)."""
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": str(home / "aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(home / "aws-credentials"),
        "AWS_EC2_METADATA_DISABLED": "true",
    }


def create_bucket(endpoint: str, name: str) -> None:
    import boto3

    boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    ).create_bucket(Bucket=name)
