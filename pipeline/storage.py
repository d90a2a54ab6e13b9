"""Where a job's files live: a local folder, or an object store (``s3://``, ``gs://``).

Local paths stay :class:`pathlib.Path` and keep their own guarantees (atomic renames, ``fsync``,
``flock``; see ``pipeline/io.py`` and ``pipeline/locks.py``). An object store is reached through
pyarrow's filesystems (``S3FileSystem``, ``GcsFileSystem``): Parquet footers and row groups are
read with ranged requests, so a chunk reads only its own row groups, as on a local disk.

Credentials come from each provider's standard chain and nowhere else: for S3 the environment
(``AWS_ACCESS_KEY_ID``...), the shared config and credentials files (``AWS_PROFILE``), web identity
and the instance or task role; for GCS application default credentials. labelmill never reads,
logs or writes one: job files have no key for them, and a URI is refused if it carries any
(``s3://key:secret@bucket``). A store other than the provider's own (MinIO, Ceph, a test server)
is named with ``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``), as every AWS SDK reads it.

What object stores give, and what labelmill builds on it:

- An object becomes visible only when its upload is complete: a reader sees all of a part or
  none of it, which is what the local write-and-rename gives. Markers are written after their
  part, as on disk.
- There is no ``flock``: a run folder's lock is a lease object (:class:`LeaseLock`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pyarrow as pa
import pyarrow.fs as pafs

from pipeline.errors import ConfigError, MissingDependencyError, OutputError, RunLockedError

SCHEMES = ("s3", "gs")
_URI = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://(.*)$")


def scheme(location: str | Path | ObjectPath) -> str | None:
    """``s3``, ``gs``, or None for a local path; any other scheme is refused, naming it."""
    if isinstance(location, ObjectPath):
        return location.scheme
    if isinstance(location, Path):
        return None
    found = _URI.match(str(location))
    if not found:
        return None
    name = found.group(1).lower()
    if name not in SCHEMES:
        raise ConfigError(
            f"{location}: '{name}://' is not a storage labelmill reads or writes",
            hint="use a local path, s3://bucket/key or gs://bucket/key",
        )
    return name


def is_remote(location: str | Path | ObjectPath) -> bool:
    return scheme(location) is not None


@dataclass(frozen=True)
class ObjectPath:
    """An object or a prefix in a bucket: ``s3://bucket/key``. Behaves like the few parts of
    :class:`pathlib.Path` the pipeline uses for names (``name``, ``suffix``, ``/``)."""

    uri: str

    @classmethod
    def parse(cls, location: str) -> ObjectPath:
        found = _URI.match(location.strip())
        if not found or found.group(1).lower() not in SCHEMES:
            raise ConfigError(f"{location} is not an s3:// or gs:// URI")
        rest = found.group(2).strip("/")
        bucket = rest.split("/", 1)[0]
        if "@" in bucket or ":" in bucket:
            raise ConfigError(
                f"{found.group(1)}://{bucket.rsplit('@', 1)[-1]}/...: a storage URI must not carry "
                "credentials",
                hint="give them through the provider's standard chain (environment, profile, "
                "instance role), never in a job file",
            )
        if not bucket:
            raise ConfigError(f"{location}: no bucket named")
        return cls(f"{found.group(1).lower()}://{re.sub('/+', '/', rest)}")

    @property
    def scheme(self) -> str:
        return self.uri.split("://", 1)[0]

    @property
    def bucket(self) -> str:
        return self.uri.split("://", 1)[1].split("/", 1)[0]

    @property
    def key(self) -> str:
        rest = self.uri.split("://", 1)[1]
        return rest.split("/", 1)[1] if "/" in rest else ""

    @property
    def fs_path(self) -> str:
        """The path pyarrow's filesystem takes: ``bucket/key``."""
        return self.uri.split("://", 1)[1]

    @property
    def name(self) -> str:
        return PurePosixPath(self.fs_path).name

    @property
    def suffix(self) -> str:
        return PurePosixPath(self.fs_path).suffix

    @property
    def stem(self) -> str:
        return PurePosixPath(self.fs_path).stem

    @property
    def suffixes(self) -> list[str]:
        return PurePosixPath(self.fs_path).suffixes

    @property
    def parent(self) -> ObjectPath:
        return ObjectPath(f"{self.scheme}://{PurePosixPath(self.fs_path).parent}")

    def __truediv__(self, other: str) -> ObjectPath:
        return ObjectPath(f"{self.uri}/{str(other).strip('/')}")

    def __str__(self) -> str:
        return self.uri

    @property
    def fs(self) -> pafs.FileSystem:
        return filesystem(self.scheme, self.bucket)


def location(value: str | Path | ObjectPath) -> Path | ObjectPath:
    """A job's ``input:``, ``output:`` or ``cache.path`` as a local path or an object path."""
    if isinstance(value, (Path, ObjectPath)):
        return value
    return ObjectPath.parse(value) if is_remote(value) else Path(os.path.expanduser(value))


@functools.cache
def filesystem(scheme_: str, bucket: str) -> pafs.FileSystem:
    """pyarrow's filesystem for one bucket (for S3, in the bucket's own region), made once per
    process. Credentials are resolved by the provider's SDK (see the module's docstring)."""
    try:
        fs, _ = pafs.FileSystem.from_uri(f"{scheme_}://{bucket}")
    except (OSError, pa.ArrowException) as exc:
        raise OutputError(
            f"{scheme_}://{bucket}: cannot reach the bucket ({_short(exc)})",
            hint="check the bucket's name, the network, and the credentials the provider's "
            "standard chain finds (environment, profile, instance role); AWS_ENDPOINT_URL names "
            "an S3-compatible server other than AWS",
        ) from None
    return fs


def open_input(path: Path | ObjectPath) -> pa.NativeFile:
    """A random-access handle: a local file, or an object read with ranged requests."""
    if isinstance(path, ObjectPath):
        return path.fs.open_input_file(path.fs_path)
    return pa.OSFile(str(path))


def size(path: ObjectPath) -> int | None:
    info = path.fs.get_file_info(path.fs_path)
    return info.size if info.type == pafs.FileType.File else None


def exists(path: ObjectPath) -> bool:
    return path.fs.get_file_info(path.fs_path).type != pafs.FileType.NotFound


def list_files(prefix: ObjectPath) -> list[tuple[ObjectPath, int]]:
    """Every object below ``prefix`` (recursively) with its size, sorted by name; none when the
    prefix holds nothing."""
    selector = pafs.FileSelector(prefix.fs_path, recursive=True, allow_not_found=True)
    found = [
        (ObjectPath(f"{prefix.scheme}://{info.path}"), info.size)
        for info in prefix.fs.get_file_info(selector)
        if info.type == pafs.FileType.File
    ]
    return sorted(found, key=lambda item: item[0].uri)


def read_bytes(path: ObjectPath) -> bytes:
    with path.fs.open_input_stream(path.fs_path) as fh:
        return fh.read()


def write_bytes(path: ObjectPath, data: bytes) -> None:
    """One object, visible only once the upload is complete (a reader never sees part of it)."""
    try:
        with path.fs.open_output_stream(path.fs_path) as fh:
            fh.write(data)
    except (OSError, pa.ArrowException) as exc:
        raise OutputError(
            f"could not write {path}: {_short(exc)}",
            hint="check the bucket's permissions and the credentials the provider's chain finds",
        ) from None


def create_if_absent(path: ObjectPath, data: bytes) -> bool:
    """Write the object unless one exists; True when this call created it. On S3 a conditional
    write (``If-None-Match: *``), so of two writers exactly one wins; elsewhere a check, then a
    write."""
    if path.scheme == "s3":
        from botocore.exceptions import ClientError

        try:
            _s3_client().put_object(Bucket=path.bucket, Key=path.key, Body=data, IfNoneMatch="*")
            return True
        except ClientError as exc:
            if _code(exc) in ("PreconditionFailed", "ConditionalRequestConflict"):
                return False
            raise OutputError(f"could not write {path}: {_short(exc)}") from None
    if exists(path):
        return False
    write_bytes(path, data)
    return True


def _s3_client():
    try:
        import boto3
    except ImportError:
        raise MissingDependencyError(
            "locks and conditional writes on S3 need boto3", hint="pip install 'labelmill[s3]'"
        ) from None
    return boto3.client("s3")


def delete(path: ObjectPath) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.fs.delete_file(path.fs_path)


def delete_tree(prefix: ObjectPath) -> None:
    for path, _ in list_files(prefix):
        delete(path)


def _short(exc: Exception) -> str:
    return str(exc).splitlines()[0][:300]


class LeaseLock:
    """A run folder's lock on an object store: a lease object, taken by a conditional create.

    Taking it is ``PUT <folder>/.lock`` with ``If-None-Match: *``: of two runs that try at once,
    the store lets exactly one create it. The object holds its owner and an expiry
    (``LABELMILL_LEASE_SECONDS``, default 120 s from now); the owner renews it every third of
    that with ``If-Match`` on the ETag it wrote, so a renewal can't overwrite a lock someone else
    took. A run that dies stops renewing: once the expiry has passed, the next run takes the lease
    over with ``If-Match`` on the expired object's ETag (two runs taking over at once: one wins).
    A run whose renewal fails (the store unreachable for longer than the lease, or the lease taken
    over) stops before its next chunk is committed, so two runs never write the same folder.
    Released by a delete conditional on the ETag. Needs conditional writes: AWS S3 and most
    S3-compatible stores have them (MinIO, Ceph RGW, R2, moto); the lock of a ``gs://`` folder is
    not implemented yet, and is refused.
    """

    def __init__(self, path: ObjectPath, lease_seconds: float | None = None) -> None:
        if path.scheme != "s3":
            raise ConfigError(
                f"{path}: a run folder or cache on {path.scheme}:// can't be locked yet (its lease "
                "needs conditional writes, implemented for S3 only)",
                hint="write the output to s3:// or a local folder; gs:// works for input:",
            )
        self.path = path
        self.lease = lease_seconds or float(os.environ.get("LABELMILL_LEASE_SECONDS") or 120)
        self.owner = f"{socket.gethostname()} process {os.getpid()} ({uuid.uuid4().hex[:12]})"
        self._etag: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost: str | None = None
        """Why the lease was lost while held (a renewal failed), else None."""

    @functools.cached_property
    def _client(self):
        return _s3_client()

    def _body(self) -> bytes:
        return json.dumps({"owner": self.owner, "expires": time.time() + self.lease}).encode()

    def _put(self, **condition) -> str:
        answer = self._client.put_object(
            Bucket=self.path.bucket, Key=self.path.key, Body=self._body(), **condition
        )
        return answer["ETag"]

    def holder(self) -> tuple[dict, str] | None:
        """The lease as stored and its ETag, or None when nobody holds one."""
        try:
            got = self._client.get_object(Bucket=self.path.bucket, Key=self.path.key)
        except self._client.exceptions.NoSuchKey:
            return None
        try:
            about = json.loads(got["Body"].read())
        except ValueError:
            about = {"owner": "unknown", "expires": 0}
        return about, got["ETag"]

    def acquire(self) -> None:
        from botocore.exceptions import ClientError

        try:
            self._etag = self._put(IfNoneMatch="*")
        except ClientError as exc:
            if _code(exc) not in ("PreconditionFailed", "ConditionalRequestConflict"):
                raise _store_error(self.path, exc) from None
            held = self.holder()
            if held is not None and held[0].get("expires", 0) > time.time():
                raise self._refused(held[0]) from None
            try:  # expired (its run died): take it over, unless another run just did
                self._etag = self._put(IfMatch=held[1]) if held else self._put(IfNoneMatch="*")
            except ClientError as again:
                if _code(again) in ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey"):
                    raise self._refused((self.holder() or ({},))[0]) from None
                raise _store_error(self.path, again) from None
        self._thread = threading.Thread(target=self._renew, name="labelmill-lease", daemon=True)
        self._thread.start()

    def _refused(self, about: dict) -> RunLockedError:
        left = max(0, round(about.get("expires", 0) - time.time()))
        return RunLockedError(
            f"run folder {self.path.parent} is in use by {about.get('owner', 'another run')} "
            f"(its lease ends in {left} s unless renewed)",
            hint="wait for that run to finish, or give this job another output: folder; a run "
            "that died gives its lease up when it expires",
        )

    def _renew(self) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        while not self._stop.wait(self.lease / 3):
            try:
                self._etag = self._put(IfMatch=self._etag)
            except ClientError as exc:
                if _code(exc) in ("PreconditionFailed", "NoSuchKey"):
                    self.lost = "another run took over its lease"
                    return
            except BotoCoreError:
                pass  # the store is unreachable: the next renewal tries again, within the lease
            if self._etag is None:
                return

    def check(self) -> None:
        """Raise if the lease was lost: the caller must stop writing to the folder."""
        if self.lost:
            raise RunLockedError(
                f"run folder {self.path.parent}: the lock was lost ({self.lost})",
                hint="rerun: finished chunks are kept",
            )

    def release(self) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._etag is not None and not self.lost:
            # taken over meanwhile, or unreachable: the lease expires by itself
            with contextlib.suppress(ClientError, BotoCoreError):
                self._client.delete_object(Bucket=self.path.bucket, Key=self.path.key, IfMatch=self._etag)
        self._etag = None

    def held_by_other(self) -> bool:
        held = self.holder()
        return held is not None and held[0].get("expires", 0) > time.time() and held[1] != self._etag


def _code(exc) -> str:
    return str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))


def _store_error(path: ObjectPath, exc: Exception) -> OutputError:
    return OutputError(
        f"cannot take the lock {path}: {_short(exc)}",
        hint="check the bucket's permissions (PutObject, GetObject, DeleteObject) and the "
        "credentials the provider's standard chain finds",
    )
