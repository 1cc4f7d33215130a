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
    from moto.server import ThreadedMotoServer

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
