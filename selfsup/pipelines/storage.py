"""Object storage: keys under an `s3://bucket/prefix` or a local directory.

Every path in selfsup is either `s3://bucket/prefix` or a local directory; `open_store` gives the
same small interface (`Store`) for both. Which S3 service, and how its requests are retried:
`endpoints.py`.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
import tempfile
from pathlib import Path

from selfsup.pipelines.endpoints import (Endpoint, StorageError, explain, pyarrow_fs, resolve_endpoint, retrying,
                                         s3_client)


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


class Store:
    """Keys under one root (an `s3://bucket/prefix` or a local directory)."""

    uri: str

    def read(self, key: str) -> bytes: ...
    def write(self, key: str, data: bytes, metadata: dict[str, str] | None = None) -> None: ...
    def create(self, key: str, data: bytes) -> bool: ...  # write only if absent, atomically: False if present
    def upload(self, key: str, fileobj, metadata: dict[str, str] | None = None) -> None: ...
    def exists(self, key: str) -> bool: ...
    def sha256(self, key: str) -> str | None: ...
    def list(self, prefix: str = "") -> list[str]: ...
    def walk(self, prefix: str = ""): ...  # (key, size, version tag) in key order, a page at a time
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

    def create(self, key, data):
        path = self._p(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return False
        except OSError as e:
            raise StorageError(f"cannot write {self.url(key)}: {e.strerror or e}") from None
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return True

    def upload(self, key, fileobj, metadata=None):
        # Write then rename: a reader never sees half a file, an interrupt leaves none.
        path = self._p(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        except OSError as e:
            raise StorageError(f"cannot write {self.url(key)}: {e.strerror or e}") from None
        try:
            with os.fdopen(fd, "wb") as f:
                shutil.copyfileobj(fileobj, f)
            os.replace(tmp, path)
        except BaseException as e:
            Path(tmp).unlink(missing_ok=True)
            if isinstance(e, OSError):  # a full disk, say: one line naming the file
                raise StorageError(f"cannot write {self.url(key)}: {e.strerror or e}") from None
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
        return sorted(k for k, _, _ in self.walk(prefix))

    def walk(self, prefix=""):
        base = self._p(prefix) if prefix else self.root
        if not base.exists():
            return
        # one folder at a time (files sorted, then its subfolders, depth first): links not followed
        stack = [base]
        while stack:
            folder = stack.pop()
            files, dirs = [], []
            with os.scandir(folder) as it:
                for e in it:
                    if e.is_dir(follow_symlinks=False):
                        dirs.append(e.path)
                    elif e.is_file() and not e.name.startswith(".tmp-"):
                        st = e.stat()
                        files.append((str(Path(e.path).relative_to(self.root)), st.st_size, str(st.st_mtime_ns)))
            yield from sorted(files)
            stack += sorted(dirs, reverse=True)

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

    def create(self, key, data):
        # a conditional put: the server refuses it when the key exists
        return self._unless(("PreconditionFailed", "412", "ConditionalRequestConflict"), f"writing {self.url(key)}",
                            self.client.put_object, Bucket=self.bucket, Key=self._k(key), Body=data,
                            IfNoneMatch="*") is not None

    def upload(self, key, fileobj, metadata=None):
        # boto3's managed transfer: multipart above 8 MiB, parts in parallel, retried.
        extra = {"Metadata": metadata} if metadata else None
        with self._errors(f"writing {self.url(key)}"):
            start = fileobj.tell()

            def put():
                fileobj.seek(start)  # a retry sends the object from its start
                self.client._client.upload_fileobj(_KeepOpen(fileobj), self.bucket, self._k(key), ExtraArgs=extra)
            retrying(self.ep, put)

    def _unless(self, codes: tuple[str, ...], what: str, call, **kwargs):
        """call(**kwargs), or None when S3 answers with one of these error codes; any other failure
        is one StorageError naming the endpoint and `what`."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return call(**kwargs)
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in codes:
                return None
            raise explain(e, self.ep, what) from None
        except BotoCoreError as e:
            raise explain(e, self.ep, what) from None

    def _head(self, key):
        return self._unless(("404", "NoSuchKey", "NotFound"), f"reading {self.url(key)}", self.client.head_object,
                            Bucket=self.bucket, Key=self._k(key))

    def exists(self, key):
        return self._head(key) is not None

    def sha256(self, key):
        head = self._head(key)
        return None if head is None else head.get("Metadata", {}).get("sha256")

    def list(self, prefix=""):
        return sorted(k for k, _, _ in self.walk(prefix))

    def walk(self, prefix=""):
        full = self._k(prefix) + "/" if prefix else (self.prefix + "/" if self.prefix else "")
        strip = len(self.prefix) + 1 if self.prefix else 0
        args = {"Bucket": self.bucket, "Prefix": full}
        while True:  # a page (1000 keys) at a time: ten million keys never sit in memory at once
            with self._errors(f"listing {self.uri}"):
                page = self.client.list_objects_v2(**args)
            for o in page.get("Contents", []):
                if not o["Key"].endswith("/"):  # a folder marker, not a file
                    yield o["Key"][strip:], o["Size"], o.get("ETag", "")
            if not page.get("IsTruncated"):
                return
            args["ContinuationToken"] = page["NextContinuationToken"]

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
