"""A real S3 API server on 127.0.0.1 for the tests and benchmarks: moto's server mode, in a thread.

Every request goes over HTTP through the same clients as against AWS
(pyarrow's C++ S3 client, boto3), pointed at it by AWS_ENDPOINT_URL; nothing
is mocked on the client side.

moto 5.2.1 answers CompleteMultipartUpload with the root element
`CompleteMultipartUploadResponse` instead of `CompleteMultipartUploadResult`
(getmoto/moto#10055, fixed by #10056 after 5.2.1). boto3 does not care;
pyarrow's AWS SDK reads it as an error embedded in a 200 and retries until
it fails. `start()` corrects the element name in that one response of the
server it runs (a fix of the server under test, not of any client).
"""

from __future__ import annotations

import os
import time

BAD, GOOD = b"CompleteMultipartUploadResponse", b"CompleteMultipartUploadResult"
ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
       "AWS_REGION": "us-east-1"}


def _patch_complete_multipart() -> None:
    from moto.s3.responses import S3Response

    if getattr(S3Response, "_fastkl_patched", False):
        return
    serialized = S3Response.serialized

    def fixed(self, action_result):
        status, headers, body = serialized(self, action_result)
        if self.data.get("Action") == "CompleteMultipartUpload":
            if isinstance(body, str):
                body = body.replace(BAD.decode(), GOOD.decode())
            elif isinstance(body, bytes):
                body = body.replace(BAD, GOOD)
        return status, headers, body

    S3Response.serialized = fixed
    S3Response._fastkl_patched = True


def start():
    """Start moto's S3 server on a free port of 127.0.0.1; returns (server, endpoint URL)."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    _patch_complete_multipart()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    return server, f"http://{host}:{port}"


def environment(endpoint: str) -> dict:
    """The environment a client needs for the server: endpoint, dummy credentials, region."""
    return dict(ENV, AWS_ENDPOINT_URL=endpoint, AWS_EC2_METADATA_DISABLED="true")


def make_bucket(name: str) -> None:
    import boto3

    boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"]).create_bucket(Bucket=name)


class FaultProxy:
    """A tiny HTTP proxy on 127.0.0.1 in front of the server that injects store weather.

    `fail(predicate, n)`: the next n requests for which predicate(method, path)
    holds get a 503 SlowDown (what S3 answers when it throttles), every
    other one a 500 InternalError, without reaching the server. `strip_conditions`: drop If-None-Match / If-Match,
    as an S3-compatible server without conditional writes ignores them. `delay_s`: every request forwarded
    waits that long first (a distant store's round trip; requests in flight at once wait at once).
    `seen` counts the requests forwarded, `failed` the ones refused, `log` lists them.
    """

    def __init__(self, upstream: str):
        import http.client
        import http.server
        import threading
        from urllib.parse import urlsplit

        self.upstream = urlsplit(upstream)
        self.rules: list = []
        self.strip_conditions = False
        self.delay_s = 0.0
        self.seen = 0
        self.failed = 0
        self.by_method: dict[str, int] = {}
        self.log: list[tuple[str, str]] = []  # (method, path and query) of every request, in order
        self._lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _body(self) -> bytes:
                if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
                    out = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline().strip():  # trailers
                                pass
                            return out
                        out += self.rfile.read(size)
                        self.rfile.readline()
                n = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(n) if n else b""

            def _any(self):
                body = self._body()
                fail = proxy._should_fail(self.command, self.path)
                if fail:
                    msg = (b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
                           if fail % 2 else b"<Error><Code>InternalError</Code><Message>Try again.</Message></Error>")
                    self.send_response(503 if fail % 2 else 500)
                    self.send_header("Content-Length", str(len(msg)))
                    self.send_header("Content-Type", "application/xml")
                    self.end_headers()
                    self.wfile.write(msg)
                    return
                if proxy.delay_s:
                    time.sleep(proxy.delay_s)
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("host", "content-length", "transfer-encoding")}
                if proxy.strip_conditions:
                    headers = {k: v for k, v in headers.items() if k.lower() not in ("if-none-match", "if-match")}
                conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=60)
                conn.request(self.command, self.path, body=body, headers=headers)
                r = conn.getresponse()
                data = r.read()
                self.send_response(r.status)
                head = self.command == "HEAD"  # no body: the upstream length is the object's
                for k, v in r.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection") and (head or k.lower() != "content-length"):
                        self.send_header(k, v)
                if not head:
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _any

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def fail(self, predicate, n: int) -> None:
        with self._lock:
            self.rules.append([predicate, n])

    def _should_fail(self, method: str, path: str) -> int:
        """0 to forward the request, else the number of this failure (1, 2, ...)."""
        with self._lock:
            self.seen += 1
            self.by_method[method] = self.by_method.get(method, 0) + 1
            self.log.append((method, path))
            for rule in self.rules:
                if rule[1] > 0 and rule[0](method, path):
                    rule[1] -= 1
                    self.failed += 1
                    return self.failed
        return 0

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def start_process(port: int = 0):
    """moto's server in a process of its own (benchmarks: not sharing the GIL with the job).
    Returns (Popen, endpoint URL)."""
    import socket
    import subprocess
    import sys
    import time

    if not port:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, __file__, str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            break
        except OSError:
            time.sleep(0.05)
    return proc, f"http://127.0.0.1:{port}"


if __name__ == "__main__":  # python tests/s3server.py PORT: serve until killed
    import sys
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    _patch_complete_multipart()
    ThreadedMotoServer(ip_address="127.0.0.1", port=int(sys.argv[1]), verbose=False).start()
    import threading

    threading.Event().wait()
