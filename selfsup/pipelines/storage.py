"""Object storage: the one place that builds S3 clients and filesystems.

Where the endpoint comes from, in order:
1. `AWS_ENDPOINT_URL` (with `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`): MinIO, a
   SeaweedFS you run yourself, or AWS S3 itself.
2. `SELFSUP_STORAGE=aws`: AWS S3 with boto3's usual credential chain (profiles, instance roles).
3. Otherwise the embedded SeaweedFS server under `$SELFSUP_HOME` (see `seaweed.py`), started on
   demand.

Every path in selfsup is either `s3://bucket/prefix` or a local directory; `open_store` gives the
same small interface (`Store`) for both.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
from urllib.parse import urlsplit
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path


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


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    rest = uri[len("s3://"):]
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise StorageError(f"{uri!r} names no bucket: expected s3://bucket/prefix")
    return bucket, prefix.strip("/")


def join(uri: str, *parts: str) -> str:
    out = str(uri).rstrip("/")
    for p in parts:
        out += "/" + p.strip("/")
    return out


def check_key(key: str, what: str = "key") -> str:
    """A key (a path under a store's root) must stay under that root: relative, no `.`/`..` or
    empty parts, no backslash. Keys from manifests and configs pass here before any I/O."""
    if (not isinstance(key, str) or not key or key.startswith("/") or "\\" in key or "\0" in key
            or any(p in ("", ".", "..") for p in key.split("/"))):
        raise StorageError(f"{what} {key!r} is not a relative path inside its root")
    return key


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


class Store:
    """Keys under one root (an `s3://bucket/prefix` or a local directory)."""

    uri: str

    def read(self, key: str) -> bytes: ...
    def write(self, key: str, data: bytes, metadata: dict[str, str] | None = None) -> None: ...
    def upload(self, key: str, fileobj, metadata: dict[str, str] | None = None) -> None: ...
    def exists(self, key: str) -> bool: ...
    def sha256(self, key: str) -> str | None: ...
    def list(self, prefix: str = "") -> list[str]: ...
    def delete(self, key: str) -> None: ...
    def open(self, key: str): ...

    def read_text(self, key: str) -> str:
        return self.read(key).decode()

    def url(self, key: str) -> str:
        return join(self.uri, key)


class LocalStore(Store):
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser().absolute()
        self.uri = str(self.root)

    def _p(self, key: str) -> Path:
        return self.root / check_key(key)

    def read(self, key):
        try:
            return self._p(key).read_bytes()
        except FileNotFoundError:
            raise FileNotFoundError(self.url(key)) from None

    def write(self, key, data, metadata=None):
        self.upload(key, io.BytesIO(data), metadata)

    def upload(self, key, fileobj, metadata=None):
        # Write then rename: a reader never sees half a file, an interrupt leaves none.
        path = self._p(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                shutil.copyfileobj(fileobj, f)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def exists(self, key):
        return self._p(key).is_file()

    def sha256(self, key):
        p = self._p(key)
        if not p.is_file():
            return None
        h = hashlib.sha256()
        with p.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()

    def list(self, prefix=""):
        base = self._p(prefix) if prefix else self.root
        if not base.exists():
            return []
        return sorted(
            str(p.relative_to(self.root)) for p in base.rglob("*") if p.is_file() and not p.name.startswith(".tmp-")
        )

    def delete(self, key):
        self._p(key).unlink(missing_ok=True)

    def open(self, key):
        return self._p(key).open("rb")


class S3Store(Store):
    def __init__(self, uri: str, ep: Endpoint, create_bucket: bool = False):
        self.uri = uri.rstrip("/")
        self.ep = ep
        self.bucket, self.prefix = split_s3(uri)
        self.client = _RetryingClient(s3_client(ep), ep)
        self._check(create_bucket)

    def _check(self, create: bool) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
            return
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code", "")
            if code not in ("404", "NoSuchBucket", "NotFound"):
                raise explain(e, self.ep, f"opening bucket {self.bucket!r}") from None
        except BotoCoreError as e:
            raise explain(e, self.ep, f"opening bucket {self.bucket!r}") from None
        if not create:
            raise StorageError(f"bucket {self.bucket!r} does not exist at {self.ep.describe()}")
        try:
            self.client.create_bucket(Bucket=self.bucket)
        except (ClientError, BotoCoreError) as e:
            raise explain(e, self.ep, f"creating bucket {self.bucket!r}") from None

    def _k(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    @contextlib.contextmanager
    def _errors(self, what: str):
        """A failed request (endpoint gone mid-way, refused) as one StorageError naming the endpoint."""
        from boto3.exceptions import S3UploadFailedError
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            yield
        except (BotoCoreError, ClientError) as e:
            raise explain(e, self.ep, what) from None
        except S3UploadFailedError as e:
            raise explain(e.__context__ if isinstance(e.__context__, Exception) else e, self.ep, what) from None

    def read(self, key):
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            raw = self.client._client  # the body's read fails mid-way too: retry the whole of it
            return retrying(self.ep, lambda: raw.get_object(Bucket=self.bucket, Key=self._k(key))["Body"].read())
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                raise FileNotFoundError(self.url(key)) from None
            raise explain(e, self.ep, f"reading {self.url(key)}") from None
        except BotoCoreError as e:
            raise explain(e, self.ep, f"reading {self.url(key)}") from None

    def write(self, key, data, metadata=None):
        self.upload(key, io.BytesIO(data), metadata)

    def upload(self, key, fileobj, metadata=None):
        # boto3's managed transfer: multipart above 8 MiB, parts in parallel, retried.
        extra = {"Metadata": metadata} if metadata else None
        with self._errors(f"writing {self.url(key)}"):
            start = fileobj.tell()

            def put():
                fileobj.seek(start)  # a retry sends the object from its start
                self.client._client.upload_fileobj(_KeepOpen(fileobj), self.bucket, self._k(key), ExtraArgs=extra)
            retrying(self.ep, put)

    def _head(self, key):
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return self.client.head_object(Bucket=self.bucket, Key=self._k(key))
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise explain(e, self.ep, f"reading {self.url(key)}") from None
        except BotoCoreError as e:
            raise explain(e, self.ep, f"reading {self.url(key)}") from None

    def exists(self, key):
        return self._head(key) is not None

    def sha256(self, key):
        head = self._head(key)
        return None if head is None else head.get("Metadata", {}).get("sha256")

    def list(self, prefix=""):
        full = self._k(prefix) if prefix else (self.prefix + "/" if self.prefix else "")
        strip = len(self.prefix) + 1 if self.prefix else 0
        out = []
        with self._errors(f"listing {self.uri}"):
            pages = self.client.get_paginator("list_objects_v2")
            for o in retrying(self.ep, lambda: pages.paginate(Bucket=self.bucket, Prefix=full).build_full_result()).get("Contents", []):
                out.append(o["Key"][strip:])
        return sorted(out)

    def delete(self, key):
        with self._errors(f"deleting {self.url(key)}"):
            self.client.delete_object(Bucket=self.bucket, Key=self._k(key))

    def open(self, key):
        return io.BytesIO(self.read(key))


class _KeepOpen:
    """A file object boto3 cannot close: it closes the one it was given when an upload fails,
    and a retry reads it again."""

    def __init__(self, f):
        self._f = f

    def __getattr__(self, name):
        return getattr(self._f, name)

    def close(self):
        pass


class _RetryingClient:
    """A boto3 S3 client whose calls go through `retrying` (S3Store retries whole listings,
    whole reads and rewound uploads itself)."""

    def __init__(self, client, ep: Endpoint):
        self._client, self._ep = client, ep

    def __getattr__(self, name):
        attr = getattr(self._client, name)
        if not callable(attr) or name == "get_paginator":
            return attr
        return lambda *a, **k: retrying(self._ep, attr, *a, **k)


def open_store(uri: str, ep: Endpoint | None = None, create: bool = False) -> Store:
    """A `Store` for `s3://bucket/prefix` (bucket created when `create`) or a local directory."""
    uri = str(uri)
    if is_s3(uri):
        return S3Store(uri, ep or resolve_endpoint(), create_bucket=create)
    if uri.startswith(("http://", "https://", "gs://", "file://")):
        raise StorageError(f"unsupported location {uri!r}: use s3://bucket/prefix or a local path")
    return LocalStore(uri)


def fs_and_path(uri: str, ep: Endpoint | None = None):
    """(pyarrow filesystem, path within it) for Ray Data and Ray Train storage."""
    from pyarrow import fs

    if is_s3(uri):
        bucket, prefix = split_s3(uri)
        return pyarrow_fs(ep or resolve_endpoint()), f"{bucket}/{prefix}".rstrip("/")
    return fs.LocalFileSystem(), str(Path(uri).expanduser().absolute())
