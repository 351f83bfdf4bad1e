"""Where the S3 service is and how to talk to it: endpoints, clients, retries, errors.

Where the endpoint comes from, in order:
1. `AWS_ENDPOINT_URL` (with `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`): MinIO, a
   SeaweedFS you run yourself, or AWS S3 itself.
2. `SELFSUP_STORAGE=aws`: AWS S3 with boto3's usual credential chain (profiles, instance roles).
3. Otherwise the embedded SeaweedFS server under `$SELFSUP_HOME` (see `seaweed.py`), started on
   demand.

A request that fails for want of the endpoint is retried with backoff (`retrying`, and the pyarrow
filesystem's own strategy) for `Endpoint.retry_s`; then it is one `StorageError` naming the endpoint.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from urllib.parse import urlsplit


class StorageError(RuntimeError):
    """Storage is unreachable, refuses us, or holds something unexpected. One line for the user."""


@dataclass(frozen=True)
class Endpoint:
    """How to reach an S3 service. Plain data: it travels to Ray workers by pickling."""

    url: str | None  # None: AWS S3 itself
    access_key: str | None
    secret_key: str | None
    region: str = "us-east-1"
    # A request that fails for want of the endpoint (refused, timed out, 5xx) is retried with
    # backoff for this long before it is an error: an S3 restart or a network blip is not one.
    # Short for one-off commands (a wrong endpoint answers fast); training sets storage.retry_s.
    retry_s: float = 10.0

    def env(self) -> dict[str, str]:
        out = {"AWS_REGION": self.region}
        if self.url:
            out["AWS_ENDPOINT_URL"] = self.url
        if self.access_key:
            out["AWS_ACCESS_KEY_ID"] = self.access_key
        if self.secret_key:
            out["AWS_SECRET_ACCESS_KEY"] = self.secret_key
        return out

    def describe(self) -> str:
        return self.url or "AWS S3"


@contextlib.contextmanager
def environ(env: dict[str, str]):
    """These variables set in this process (and so in Ray processes started meanwhile) for the
    block, then as they were."""
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def endpoint_from_env(environ: dict[str, str] | None = None) -> Endpoint | None:
    """The endpoint the standard AWS variables name, or None when they name none."""
    env = os.environ if environ is None else environ
    url = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    if not url and env.get("SELFSUP_STORAGE", "").lower() != "aws":
        return None
    if url:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise StorageError(f"AWS_ENDPOINT_URL {url!r} is not an http(s) URL (e.g. http://127.0.0.1:9000)")
    return Endpoint(
        url=url or None,
        access_key=env.get("AWS_ACCESS_KEY_ID"),
        secret_key=env.get("AWS_SECRET_ACCESS_KEY"),
        region=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1",
    )


def resolve_endpoint(start: bool = True) -> Endpoint:
    """The endpoint to use now; starts the embedded server when nothing else is configured."""
    ep = endpoint_from_env()
    if ep is not None:
        return ep
    from selfsup.pipelines.seaweed import EmbeddedS3

    server = EmbeddedS3()
    if start:
        return server.up()
    ep = server.endpoint()
    if ep is None:
        raise StorageError(f"the embedded S3 server under {server.root} is not running: run `selfsup storage up`")
    return ep


def s3_client(ep: Endpoint):
    import boto3
    from botocore.config import Config

    cfg = Config(
        signature_version="s3v4",
        s3={"addressing_style": "path"} if ep.url else {},
        connect_timeout=5,
        read_timeout=60,
        retries={"max_attempts": 3, "mode": "standard"},
    )
    return boto3.client(
        "s3",
        endpoint_url=ep.url,
        aws_access_key_id=ep.access_key,
        aws_secret_access_key=ep.secret_key,
        region_name=ep.region,
        config=cfg,
    )


def _pyarrow_attempts(retry_s: float) -> int:
    """Attempts of the AWS SDK's default strategy that span `retry_s` seconds (measured: n attempts
    give up after about 0.025 * 2**n s against a refused endpoint)."""
    attempts = 1
    while 0.025 * 2 ** attempts < retry_s:
        attempts += 1
    return attempts


def pyarrow_fs(ep: Endpoint):
    """A pyarrow S3 filesystem (Ray Data reads, Ray Train checkpoint uploads) that retries for
    `ep.retry_s` seconds, in this process and in every one it is pickled to."""
    from pyarrow import fs

    class RetryingS3FileSystem(fs.S3FileSystem):
        # pyarrow pickles an S3FileSystem without its retry strategy (3 quick attempts, then an
        # error: a Ray Train controller would fail the run on an S3 restart): rebuild it instead.
        def __reduce__(self):
            return pyarrow_fs, (ep,)

    kwargs = dict(region=ep.region, connect_timeout=5, request_timeout=60,
                  retry_strategy=fs.AwsDefaultS3RetryStrategy(max_attempts=_pyarrow_attempts(ep.retry_s)))
    if ep.url:
        scheme, _, host = ep.url.partition("://")
        kwargs.update(endpoint_override=host.rstrip("/"), scheme=scheme or "http")
    if ep.access_key:
        kwargs.update(access_key=ep.access_key, secret_key=ep.secret_key)
    return RetryingS3FileSystem(**kwargs)


def explain(exc: Exception, ep: Endpoint, what: str = "") -> StorageError:
    """Turn a botocore/pyarrow failure into one line that names the endpoint and what failed."""
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    where = ep.describe()
    if isinstance(exc, EndpointConnectionError) or "Could not connect" in str(exc) or "Connection refused" in str(exc):
        return StorageError(f"cannot reach S3 endpoint {where}: connection failed{f' ({what})' if what else ''}")
    if isinstance(exc, NoCredentialsError):
        return StorageError(f"no credentials for S3 endpoint {where}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")
    if isinstance(exc, ClientError):
        code = exc.response.get("Error", {}).get("Code", "?")
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403"):
            return StorageError(f"S3 endpoint {where} rejected the credentials ({code}){f' while {what}' if what else ''}")
        return StorageError(f"S3 endpoint {where} answered {code}{f' while {what}' if what else ''}")
    return StorageError(f"S3 endpoint {where}: {type(exc).__name__}: {exc}")


_TRANSIENT_CODES = {"500", "502", "503", "504", "InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout"}


def transient(exc: BaseException) -> bool:
    """Whether a failed S3 request may succeed when tried again (the endpoint away for a while)."""
    from boto3.exceptions import S3UploadFailedError
    from botocore.exceptions import ClientError, ConnectionError as BotoConnectionError, HTTPClientError

    if isinstance(exc, S3UploadFailedError) and isinstance(exc.__context__, Exception):
        return transient(exc.__context__)
    if isinstance(exc, (BotoConnectionError, HTTPClientError)):
        return True
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        return err.get("Code") in _TRANSIENT_CODES or exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) >= 500
    return False


def retrying(ep: Endpoint, fn, *args, **kwargs):
    """fn(*args, **kwargs), retried with exponential backoff (0.5 s up to 8 s) while it fails
    transiently, for at most `ep.retry_s` seconds; then the last error is raised."""
    import tenacity

    for attempt in tenacity.Retrying(
            retry=tenacity.retry_if_exception(transient), stop=tenacity.stop_after_delay(ep.retry_s),
            wait=tenacity.wait_exponential(multiplier=0.5, max=8), reraise=True):
        with attempt:
            return fn(*args, **kwargs)
