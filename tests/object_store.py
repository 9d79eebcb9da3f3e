"""An S3 endpoint the tests start on 127.0.0.1: moto's server, in a thread of the test process, as s3fs's own tests
use. Any credentials work; the dummies below go in this process's environment and in those of the processes a test
starts (`S3_CREDENTIALS`)."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

BUCKET = "boothflow-test"
S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@contextlib.contextmanager
def moto_endpoint() -> Iterator[str]:
    """Start the server, make the bucket, yield the endpoint's URL; the server stops when the block ends, however."""
    import s3fs
    from moto.server import ThreadedMotoServer

    os.environ.update(S3_CREDENTIALS)
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # a line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        url = f"http://{host}:{port}"
        # moto's objects live in the process: a second server in it (a benchmark a test runs) sees the first's bucket
        s3fs.S3FileSystem(endpoint_url=url, skip_instance_cache=True).makedirs(BUCKET, exist_ok=True)
        yield url
    finally:
        server.stop()
