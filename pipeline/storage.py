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
is named with ``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``), as every AWS SDK reads it; a
local GCS server with ``STORAGE_EMULATOR_HOST``, as Google's SDKs read it.

What object stores give, and what labelmill builds on it:

- An object becomes visible only when its upload is complete: a reader sees all of a part or
  none of it, which is what the local write-and-rename gives. Markers are written after their
  part, as on disk.
- There is no ``flock``: a run folder's lock is a lease object (:class:`LeaseLock`), written with
  each provider's conditional writes (:class:`Conditional`).
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
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.fs as pafs

from pipeline.errors import ConfigError, LabelmillError, MissingDependencyError, OutputError, RunLockedError

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
    emulator = os.environ.get("STORAGE_EMULATOR_HOST") if scheme_ == "gs" else None
    try:
        if emulator:  # Google's SDKs' convention for a local GCS server: no credentials
            where = urlsplit(emulator if "://" in emulator else f"http://{emulator}")
            fs = pafs.GcsFileSystem(anonymous=True, scheme=where.scheme, endpoint_override=where.netloc)
        else:
            fs, _ = pafs.FileSystem.from_uri(f"{scheme_}://{bucket}")
    except (OSError, pa.ArrowException) as exc:
        raise failure(f"{scheme_}://{bucket}: cannot reach the bucket", exc) from None
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
        raise failure(f"could not write {path}", exc) from None


def create_if_absent(path: ObjectPath, data: bytes) -> bool:
    """Write the object unless one exists; True when this call created it. A conditional write:
    of two writers exactly one wins."""
    return conditional(path).create(data) is not None


def delete(path: ObjectPath) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.fs.delete_file(path.fs_path)


def delete_tree(prefix: ObjectPath) -> None:
    for path, _ in list_files(prefix):
        delete(path)


def _short(exc: Exception) -> str:
    return str(exc).splitlines()[0][:300]


class Conditional:
    """Writes of one object that succeed only if it is as the caller last saw it: the compare-and-
    swap a lock needs, which pyarrow's filesystems don't offer. Each provider's own SDK does it:
    S3 with ``If-None-Match: *`` and ``If-Match: <ETag>`` (boto3), GCS with generation
    preconditions, ``ifGenerationMatch`` (google-cloud-storage). A *tag* names one version of the
    object (the ETag, the generation)."""

    def __init__(self, path: ObjectPath) -> None:
        self.path = path

    def create(self, data: bytes) -> str | None:
        """Write if no object exists; its tag, or None when one exists."""
        raise NotImplementedError

    def replace(self, data: bytes, tag: str) -> str | None:
        """Write if the object is still at ``tag``; the new tag, or None when it changed or is gone."""
        raise NotImplementedError

    def read(self) -> tuple[bytes, str] | None:
        """The object and its tag, or None."""
        raise NotImplementedError

    def delete(self, tag: str) -> None:
        """Delete if still at ``tag``; nothing otherwise."""
        raise NotImplementedError


class _S3(Conditional):
    @functools.cached_property
    def _client(self):
        try:
            import boto3
        except ImportError:
            raise MissingDependencyError(
                "a run folder or cache on S3 needs boto3 for its lock's conditional writes",
                hint="pip install 'labelmill[s3]'",
            ) from None
        return boto3.client("s3")

    def _put(self, data: bytes, **condition) -> str | None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            answer = self._client.put_object(
                Bucket=self.path.bucket, Key=self.path.key, Body=data, **condition
            )
        except ClientError as exc:
            if _code(exc) in ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey", "404"):
                return None
            raise _store_error(self.path, exc) from None
        except BotoCoreError as exc:
            raise _store_error(self.path, exc) from None
        return answer["ETag"]

    def create(self, data: bytes) -> str | None:
        return self._put(data, IfNoneMatch="*")

    def replace(self, data: bytes, tag: str) -> str | None:
        return self._put(data, IfMatch=tag)

    def read(self) -> tuple[bytes, str] | None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            got = self._client.get_object(Bucket=self.path.bucket, Key=self.path.key)
            return got["Body"].read(), got["ETag"]
        except ClientError as exc:
            if _code(exc) in ("NoSuchKey", "404"):
                return None
            raise _store_error(self.path, exc) from None
        except BotoCoreError as exc:
            raise _store_error(self.path, exc) from None

    def delete(self, tag: str) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        with contextlib.suppress(ClientError, BotoCoreError):  # changed meanwhile: not ours to delete
            self._client.delete_object(Bucket=self.path.bucket, Key=self.path.key, IfMatch=tag)


class _GCS(Conditional):
    @functools.cached_property
    def _bucket(self):
        try:
            from google.cloud import storage as gcs
        except ImportError:
            raise MissingDependencyError(
                "a run folder or cache on GCS needs google-cloud-storage for its lock's conditional writes",
                hint="pip install 'labelmill[gcs]'",
            ) from None
        return gcs.Client().bucket(self.path.bucket)  # application default credentials

    def _upload(self, data: bytes, generation: int) -> str | None:
        from google.api_core.exceptions import GoogleAPIError, NotFound, PreconditionFailed

        blob = self._bucket.blob(self.path.key)
        try:
            blob.upload_from_string(data, if_generation_match=generation)
        except (PreconditionFailed, NotFound):
            return None
        except GoogleAPIError as exc:
            raise _store_error(self.path, exc) from None
        return str(blob.generation)

    def create(self, data: bytes) -> str | None:
        return self._upload(data, 0)  # generation 0: "no live object"

    def replace(self, data: bytes, tag: str) -> str | None:
        return self._upload(data, int(tag))

    def read(self) -> tuple[bytes, str] | None:
        from google.api_core.exceptions import GoogleAPIError, NotFound

        try:
            blob = self._bucket.get_blob(self.path.key)
            if blob is None:
                return None
            return blob.download_as_bytes(if_generation_match=blob.generation), str(blob.generation)
        except NotFound:
            return None
        except GoogleAPIError as exc:
            raise _store_error(self.path, exc) from None

    def delete(self, tag: str) -> None:
        from google.api_core.exceptions import GoogleAPIError

        with contextlib.suppress(GoogleAPIError):  # changed meanwhile: not ours to delete
            self._bucket.blob(self.path.key).delete(if_generation_match=int(tag))


def conditional(path: ObjectPath) -> Conditional:
    return (_S3 if path.scheme == "s3" else _GCS)(path)


class LeaseLock:
    """A run folder's lock on an object store: a lease object, taken by a conditional create.

    Taking it is a create that succeeds only where no object exists (S3 ``If-None-Match: *``, GCS
    ``ifGenerationMatch=0``): of two runs that try at once, the store lets exactly one create it.
    The object holds its owner and an expiry (``LABELMILL_LEASE_SECONDS``, default 120 s from now);
    the owner renews it every third of that, conditionally on the version it wrote, so a renewal
    can't overwrite a lock someone else took. A run that dies stops renewing: once the expiry has
    passed, the next run takes the lease over, conditionally on the expired version (two runs
    taking over at once: one wins). A run whose renewal finds the lease taken over (after the store
    was unreachable for a whole lease) stops before its next chunk is committed, so two runs never
    write the same folder. Released by a delete conditional on its version.
    """

    def __init__(self, path: ObjectPath, lease_seconds: float | None = None) -> None:
        self.path = path
        self.lease = lease_seconds or float(os.environ.get("LABELMILL_LEASE_SECONDS") or 120)
        self.owner = f"{socket.gethostname()} process {os.getpid()} ({uuid.uuid4().hex[:12]})"
        self._store = conditional(path)
        self._tag: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost: str | None = None
        """Why the lease was lost while held (a renewal found it taken over), else None."""

    def _body(self) -> bytes:
        return json.dumps({"owner": self.owner, "expires": time.time() + self.lease}).encode()

    def holder(self) -> tuple[dict, str] | None:
        """The lease as stored and its tag, or None when nobody holds one."""
        held = self._store.read()
        if held is None:
            return None
        try:
            about = json.loads(held[0])
        except ValueError:
            about = {"owner": "unknown", "expires": 0}
        return about, held[1]

    def acquire(self) -> None:
        self._tag = self._store.create(self._body())
        if self._tag is None:
            held = self.holder()
            if held is not None and held[0].get("expires", 0) > time.time():
                raise self._refused(held[0])
            # expired (its run died): take it over, unless another run just did
            self._tag = (
                self._store.replace(self._body(), held[1]) if held else self._store.create(self._body())
            )
            if self._tag is None:
                raise self._refused((self.holder() or ({},))[0])
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
        while not self._stop.wait(self.lease / 3):
            try:
                tag = self._store.replace(self._body(), self._tag)
            except OutputError:
                continue  # the store unreachable: the next renewal tries again, within the lease
            if tag is None:
                self.lost = "another run took over its lease"
                return
            self._tag = tag

    def check(self) -> None:
        """Raise if the lease was lost: the caller must stop writing to the folder."""
        if self.lost:
            raise RunLockedError(
                f"run folder {self.path.parent}: the lock was lost ({self.lost})",
                hint="rerun: finished chunks are kept",
            )

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._tag is not None and not self.lost:
            self._store.delete(self._tag)  # taken over meanwhile: not deleted; it expires
        self._tag = None

    def held_by_other(self) -> bool:
        held = self.holder()
        return held is not None and held[0].get("expires", 0) > time.time() and held[1] != self._tag


def _code(exc) -> str:
    return str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))


def _store_error(path: ObjectPath, exc: Exception) -> OutputError:
    return failure(f"{path}: the object store refused or could not be reached", exc)


def failure(
    what: str, exc: Exception, error: type[LabelmillError] = OutputError, also: str = ""
) -> LabelmillError:
    """An object store's refusal or silence as labelmill's error: what failed, the store's first
    line, and where to look."""
    return error(
        f"{what} ({_short(exc)})",
        hint="check the bucket's name and permissions, the network, and the credentials the "
        "provider's standard chain finds (environment, profile, instance role); AWS_ENDPOINT_URL "
        "names an S3-compatible server other than AWS" + also,
    )
