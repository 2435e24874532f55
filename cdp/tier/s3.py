"""The one place cdp makes its S3 client, and the small typed S3 calls the tier needs.

    s3 = S3(S3Settings(endpoint="http://127.0.0.1:7480"))   # credentials: the SDK's chain
    r = s3.put_object("bucket", "vol0/seg/000001", data, retain_until=when)  # sha256 in metadata
    r = s3.upload_file("bucket", "vol0/seg/000002", path, sha256=digest)     # multipart if large
    s3.get_range("bucket", key, start, length) -> bytes
    s3.head(bucket, key) -> ObjectInfo;  s3.list_objects(bucket, prefix) -> Iterator[ObjectInfo]
    s3.delete_objects(bucket, [ObjectRef(key, version_id)]) -> DeleteResult (refusals per object)
    s3.require_object_lock(bucket)      # ConfigError unless the bucket has object lock enabled

Every method blocks (network I/O, and hashing where it says so): call them from a worker
thread, never on the event loop. One :class:`S3` may be shared by threads (a boto3 client
is thread-safe; each :class:`S3` has its own session).

Design notes
------------
- **Plain S3 only** (PUT, ranged GET, multipart, ListObjectsV2 / ListObjectVersions, HEAD,
  DeleteObjects, object lock retention), path-style addressing, SigV4, and checksums only
  where an API requires them (``when_required``): the same calls run on AWS, Ceph RGW
  and other S3 servers. RGW (Pacific) does not speak the SDK's newer default CRC trailers.
- **Retries.** botocore's ``standard`` mode retries connection errors, timeouts, 5xx and
  throttling with jittered exponential backoff, up to ``max_attempts`` per call. A GET's
  body is read after the call returns, outside that loop, so :meth:`S3.get_range` and
  :meth:`S3.get_object` retry a cut or stalled body themselves, as often.
- **No half objects.** A multipart object exists only from CompleteMultipartUpload on;
  any failure before that aborts the upload (its parts are freed), and a failure to lock
  the completed object deletes that version: an upload either lands whole (and locked
  when asked) or not at all. A crash between create and complete leaves an *incomplete
  upload*, which no object listing shows; :meth:`S3.abort_incomplete_uploads` frees them.
- **Object lock.** Retention (COMPLIANCE) is set at write time. RGW Pacific ignores the
  retention given to CreateMultipartUpload (measured: the completed object had none), so a
  multipart object also gets PutObjectRetention after completion (idempotent on AWS).
  Uploads with retention carry Content-MD5, which AWS requires with object lock (MD5 costs
  CPU: about 0.5-1.5 GB/s, so only those uploads pay it). A locked bucket is versioned:
  deleting by key only adds a delete marker, so deletions name the version
  (:class:`ObjectRef`), and the store refuses those still under retention — reported per
  object in :class:`DeleteResult`, never raised, so a gc can skip them and retry later.
- **Bodies go to botocore as one buffer** (a ``bytearray``). botocore wraps a ``bytes``
  body in a BytesIO, then hashes it for SigV4 1 MiB and sends it 16 KiB at a time, each
  read a copy made holding the GIL: ~530 GIL hand-overs per 8 MiB, a convoy with the
  event loop on the same core, and an ``Expect: 100-continue`` round trip. A bytearray
  is hashed by one sha256 call and sent by one ``sendall``, both without the GIL
  (measured per 8 MiB PUT: 16-18 ms of thread CPU as bytes, 13-14 ms as a copied
  bytearray).
- **One sha256 pass per PUT, not two.** SigV4 over plain HTTP signs the payload's
  sha256 (``x-amz-content-sha256``), which botocore computes with a pass over the body.
  A :meth:`S3.put_object` body's sha256 is known already (the caller's ``sha256``, the
  segment's content address, or the one computed for the metadata), so this client's
  PutObject signs with it (:class:`_KnownPayloadAuth`, chosen through botocore's
  ``choose-signer`` event on this client only) instead of hashing the body again: per
  8 MiB PUT 14.5-15.4 -> 9.1-9.7 ms of thread CPU. The store checks the payload against
  the signed hash (RGW and AWS: ``400 XAmzContentSHA256Mismatch``), so a digest that is
  not the body's is refused, never stored. Bodies without a known digest (multipart
  parts) are hashed by botocore as before.
- **Errors** become cdp's (``cdp.errors``): :class:`NotFound` (no such bucket or key),
  :class:`RemoteRefused` (403, bad credentials, other 4xx), :class:`RemoteUnreachable`
  (connection, timeout, 5xx, a cut body, after the retries), :class:`OutOfRange` (416),
  :class:`ConfigError` (settings, credentials file, no credentials, a bucket without object
  lock). Each message names the operation, ``s3://bucket/key`` and the endpoint.
"""

from __future__ import annotations

import base64
import configparser
import hashlib
import logging
import os
import random
import stat
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    IncompleteReadError,
    NoCredentialsError,
    ParamValidationError,
    PartialCredentialsError,
    ReadTimeoutError,
    ResponseStreamingError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError

from cdp.errors import (
    CdpError,
    ConfigError,
    NotFound,
    OutOfRange,
    RemoteRefused,
    RemoteUnreachable,
    UsageError,
)

if TYPE_CHECKING:
    from botocore.config import Config

log = logging.getLogger("cdp.tier")

MiB = 1 << 20
#: S3's smallest part (all but the last) and the part size measured well on RGW
MIN_PART = 5 * MiB
DEFAULT_PART = 8 * MiB
#: DeleteObjects takes at most this many keys per request
DELETE_BATCH = 1000
SHA256_META = "sha256"
DEFAULT_REGION = "us-east-1"

T = TypeVar("T")


@dataclass(frozen=True)
class S3Settings:
    """Where and how to reach the object store (the ``[tier]`` table's connection part).

    ``endpoint`` None: the SDK's default (AWS). ``region`` None: the SDK's chain, else
    us-east-1. ``credentials_file`` None: the SDK's chain (``AWS_ACCESS_KEY_ID`` /
    ``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``, ...); else an AWS-style credentials file
    (``[default]`` ``aws_access_key_id``, ``aws_secret_access_key``, optional
    ``aws_session_token``) that group and other must not be able to read.
    ``max_attempts`` counts the first try.
    """

    endpoint: str | None = None
    region: str | None = None
    credentials_file: Path | None = None
    connect_timeout: float = 5.0
    read_timeout: float = 30.0
    max_attempts: int = 5
    max_pool_connections: int = 10


@dataclass(frozen=True)
class ObjectRef:
    """One object, or one version of it (``version_id``; required to really delete in a
    versioned or object-locked bucket)."""

    key: str
    version_id: str | None = None


@dataclass(frozen=True)
class ObjectInfo:
    """What HEAD or a listing says about an object. ``sha256`` and the lock fields come
    from HEAD only; ``delete_marker``/``is_latest`` from version listings only."""

    key: str
    size: int
    etag: str
    last_modified: datetime | None = None
    version_id: str | None = None
    sha256: str | None = None
    lock_mode: str | None = None
    retain_until: datetime | None = None
    delete_marker: bool = False
    is_latest: bool = True


@dataclass(frozen=True)
class PutResult:
    """A stored object: its size, the sha256 written in its metadata, ETag and version."""

    key: str
    size: int
    sha256: str
    etag: str
    version_id: str | None


@dataclass(frozen=True)
class DeleteRefusal:
    """An object DeleteObjects did not delete, with the store's code (``AccessDenied``
    for one under object lock retention)."""

    ref: ObjectRef
    code: str
    message: str


@dataclass
class DeleteResult:
    deleted: list[ObjectRef] = field(default_factory=list)
    refused: list[DeleteRefusal] = field(default_factory=list)


# -- settings and the client --------------------------------------------------------------


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://BUCKET/PREFIX`` -> (bucket, prefix); the prefix has no leading slash and,
    unless empty, ends with one. ConfigError for anything else."""
    if not url.startswith("s3://"):
        raise ConfigError(f"tier url {url!r}: expected s3://BUCKET/PREFIX")
    bucket, _, prefix = url[len("s3://"):].partition("/")
    if not bucket or not all(c.isalnum() or c in "-." for c in bucket):
        raise ConfigError(f"tier url {url!r}: bad bucket name {bucket!r}")
    prefix = prefix.strip("/")
    return bucket, (prefix + "/" if prefix else "")


def load_credentials_file(path: Path) -> tuple[str, str, str | None]:
    """(access key, secret key, session token or None) from an AWS-style credentials file.

    Refused (ConfigError naming the file and its mode) when group or other can read it.
    The ``[default]`` section is used, or the only section if there is one.
    """
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ConfigError(f"credentials_file {path}: no such file") from None
    except OSError as e:
        raise ConfigError(f"credentials_file {path}: {e.strerror}") from None
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o044:
        raise ConfigError(
            f"credentials_file {path} is readable by group or other (mode {mode:04o}): "
            f"chmod 600 it"
        )
    cp = configparser.ConfigParser(interpolation=None)
    try:
        cp.read_string(path.read_text(), source=str(path))
    except (configparser.Error, UnicodeDecodeError, OSError) as e:
        raise ConfigError(f"credentials_file {path}: not an AWS credentials file ({e})") from None
    sections = cp.sections()
    name = "default" if "default" in sections else (sections[0] if len(sections) == 1 else None)
    if name is None:
        raise ConfigError(f"credentials_file {path}: no [default] section")
    sec = cp[name]
    for k in ("aws_access_key_id", "aws_secret_access_key"):
        if not sec.get(k, "").strip():
            raise ConfigError(f"credentials_file {path}: [{name}] has no {k}")
    token = sec.get("aws_session_token", "").strip() or None
    return sec["aws_access_key_id"].strip(), sec["aws_secret_access_key"].strip(), token


def client_config(settings: S3Settings) -> Config:
    """The botocore Config of every cdp S3 client (see the design notes)."""
    from botocore.config import Config  # with boto3 below: ~0.3 s, paid when a tier starts

    return Config(
        s3={"addressing_style": "path"},
        signature_version="s3v4",
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        retries={"mode": "standard", "total_max_attempts": settings.max_attempts},
        connect_timeout=settings.connect_timeout,
        read_timeout=settings.read_timeout,
        max_pool_connections=settings.max_pool_connections,
    )


def make_client(settings: S3Settings) -> Any:
    """A boto3 S3 client for ``settings``: the one place cdp makes one. Cost: ~50-100 ms
    (botocore loads its service model); make one per tier, not per request."""
    import boto3

    keys: dict[str, Any] = {}
    if settings.credentials_file is not None:
        access, secret, token = load_credentials_file(settings.credentials_file)
        keys = {"aws_access_key_id": access, "aws_secret_access_key": secret,
                "aws_session_token": token}
    session = boto3.session.Session(region_name=settings.region, **keys)
    return session.client(
        "s3",
        endpoint_url=settings.endpoint,
        region_name=session.region_name or DEFAULT_REGION,
        config=client_config(settings),
    )


# -- errors ---------------------------------------------------------------------------------

_REFUSED_CODES = frozenset({
    "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AllAccessDisabled",
    "AccountProblem", "InvalidToken", "ExpiredToken", "RequestTimeTooSkewed", "403",
})
_UNAVAILABLE_CODES = frozenset({
    "SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "Throttling",
    "ThrottlingException", "RequestThrottled",
})


@cache
def _body_errors() -> tuple[type[BaseException], ...]:
    """Failures of a response body being read (after the call returned). urllib3 loads
    here, with the first client, not when cdpd starts without a tier."""
    from urllib3.exceptions import HTTPError as Urllib3HTTPError

    return (IncompleteReadError, ResponseStreamingError, ReadTimeoutError,
            ConnectionClosedError, Urllib3HTTPError, ConnectionError, TimeoutError)


def _backoff(attempt: int) -> float:
    """Seconds before retry ``attempt`` (1, 2, ...): full jitter, 0.1 s doubling, cap 5 s."""
    return random.uniform(0.0, min(5.0, 0.1 * 2 ** attempt))


# -- the client ---------------------------------------------------------------------------


class S3:
    """Typed, error-mapped S3 calls on one client (see the module notes)."""

    def __init__(self, settings: S3Settings, *, client: Any | None = None) -> None:
        self.settings = settings
        self.client = client if client is not None else make_client(settings)
        self.endpoint: str = settings.endpoint or str(self.client.meta.endpoint_url)
        _sign_known_payloads(self.client)

    # ---- error mapping
    def error(self, exc: BaseException, op: str, bucket: str, key: str | None = None) -> CdpError:
        """``exc`` (from botocore) as a cdp error whose message names op, object, endpoint."""
        where = f"s3://{bucket}/{key}" if key is not None else f"s3://{bucket}"
        head = f"S3 {op} {where} at {self.endpoint}"
        if isinstance(exc, CdpError):
            return exc
        if isinstance(exc, ClientError):
            err = exc.response.get("Error", {})
            meta = exc.response.get("ResponseMetadata", {})
            code = str(err.get("Code") or "?")
            status = int(meta.get("HTTPStatusCode") or 0)
            msg = err.get("Message") or ""
            detail = f"{status} {code}" + (f" ({msg})" if msg and msg != code else "")
            tries = int(meta.get("RetryAttempts") or 0) + 1
            if code in ("NoSuchBucket",):
                return NotFound(f"{head}: no such bucket ({detail})")
            if code in ("NoSuchKey", "NoSuchVersion", "404", "NotFound") or status == 404:
                return NotFound(f"{head}: no such object ({detail})")
            if code in ("InvalidRange",) or status == 416:
                return OutOfRange(f"{head}: range outside the object ({detail})")
            if code in _UNAVAILABLE_CODES or status >= 500:
                return RemoteUnreachable(f"{head}: failing: {detail}, after {tries} attempt(s)")
            if code in _REFUSED_CODES or status == 403:
                return RemoteRefused(f"{head}: refused: {detail} (check the credentials "
                                     f"and the bucket's permissions)")
            return RemoteRefused(f"{head}: refused: {detail}")
        if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
            return ConfigError(
                f"{head}: no S3 credentials ({exc}): set AWS_ACCESS_KEY_ID and "
                f"AWS_SECRET_ACCESS_KEY, a profile, or [tier] credentials_file"
            )
        if isinstance(exc, ParamValidationError):
            return UsageError(f"{head}: {exc}")
        if isinstance(exc, (BotoConnectionError, *_body_errors())):
            return RemoteUnreachable(
                f"{head}: unreachable after {self.settings.max_attempts} attempt(s): {exc}"
            )
        if isinstance(exc, BotoCoreError):
            return RemoteUnreachable(f"{head}: {exc}")
        return CdpError(f"{head}: {type(exc).__name__}: {exc}")

    def _call(self, op: str, bucket: str, key: str | None, fn: Callable[..., T], **kw: Any) -> T:
        try:
            return fn(**kw)
        except Exception as e:
            raise self.error(e, op, bucket, key) from e

    def _read(self, op: str, bucket: str, key: str, kw: dict[str, Any]) -> tuple[dict[str, Any], bytes]:
        """GetObject and read its body, retrying a body that is cut or stalls (botocore's
        own retries end when the headers arrive)."""
        attempts = max(1, self.settings.max_attempts)
        for attempt in range(1, attempts + 1):
            resp = self._call(op, bucket, key, self.client.get_object, Bucket=bucket, Key=key, **kw)
            body = resp["Body"]
            try:
                return resp, body.read()
            except _body_errors() as e:
                body.close()
                if attempt == attempts:
                    raise RemoteUnreachable(
                        f"S3 {op} s3://{bucket}/{key} at {self.endpoint}: the response body "
                        f"was cut or stalled {attempts} time(s): {e}"
                    ) from e
                log.info("S3 %s s3://%s/%s: body cut (%s), retry %d", op, bucket, key, e, attempt)
                time.sleep(_backoff(attempt))
        raise AssertionError("unreachable")

    # ---- buckets
    def create_bucket(self, bucket: str, *, object_lock: bool = False) -> None:
        """Create ``bucket`` (with object lock, which makes it versioned, if asked)."""
        kw: dict[str, Any] = {"Bucket": bucket}
        region = self.client.meta.region_name
        if self.settings.region and region != DEFAULT_REGION:
            kw["CreateBucketConfiguration"] = {"LocationConstraint": region}
        if object_lock:
            kw["ObjectLockEnabledForBucket"] = True
        self._call("CreateBucket", bucket, None, self.client.create_bucket, **kw)

    def require_object_lock(self, bucket: str) -> None:
        """Return if ``bucket`` has object lock enabled; ConfigError (naming the bucket
        and endpoint) if not, NotFound if there is no such bucket."""
        try:
            cfg = self.client.get_object_lock_configuration(Bucket=bucket)
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") != "ObjectLockConfigurationNotFoundError":
                raise self.error(e, "GetObjectLockConfiguration", bucket) from e
            cfg = {}
        except Exception as e:
            raise self.error(e, "GetObjectLockConfiguration", bucket) from e
        if cfg.get("ObjectLockConfiguration", {}).get("ObjectLockEnabled") != "Enabled":
            raise ConfigError(
                f"bucket {bucket!r} at {self.endpoint} does not have object lock enabled, "
                f"which object_lock_days needs (object lock can only be chosen when a bucket "
                f"is created: make a new bucket with it, e.g. `aws s3api create-bucket "
                f"--bucket NAME --object-lock-enabled-for-bucket`)"
            )

    # ---- writes
    def put_object(
        self,
        bucket: str,
        key: str,
        data: bytes | bytearray,
        *,
        sha256: str | None = None,
        retain_until: datetime | None = None,
    ) -> PutResult:
        """One PUT of ``data``, its sha256 (hex; computed if None: ~1-2 GB/s) in the
        object's metadata and signed as the payload's hash (botocore does not hash the
        body again; a ``sha256`` that is not ``data``'s is refused by the store), with COMPLIANCE retention until ``retain_until`` if given
        (then also Content-MD5). Retried by botocore; RemoteUnreachable after that."""
        digest = sha256 or hashlib.sha256(data).hexdigest()
        body = _body(data)
        kw: dict[str, Any] = {"Bucket": bucket, "Key": key, "Body": body,
                              "Metadata": {SHA256_META: digest}}
        if retain_until is not None:
            kw.update(_lock_args(retain_until))
            kw["ContentMD5"] = _md5(data)
        with _known_payload(body, digest):
            r = self._call("PutObject", bucket, key, self.client.put_object, **kw)
        return PutResult(key, len(data), digest, str(r.get("ETag", "")), r.get("VersionId"))

    def put_multipart(
        self,
        bucket: str,
        key: str,
        parts: Iterable[bytes | bytearray],
        *,
        sha256: str,
        retain_until: datetime | None = None,
        workers: int = 1,
    ) -> PutResult:
        """A multipart upload of ``parts`` (each at least 5 MiB but the last), ``sha256``
        (hex digest of all of them, known beforehand: it goes in at creation) in the
        metadata, retention as :meth:`put_object`. Up to ``workers`` parts in flight
        (memory: that many parts). All or nothing: on any failure the upload is aborted
        (and a completed object that could not be locked is deleted) before the error
        is raised."""
        op = "CreateMultipartUpload"
        kw: dict[str, Any] = {"Bucket": bucket, "Key": key, "Metadata": {SHA256_META: sha256}}
        if retain_until is not None:
            kw.update(_lock_args(retain_until))
        up = self._call(op, bucket, key, self.client.create_multipart_upload, **kw)
        upload_id = up["UploadId"]
        size = 0
        try:
            op = "UploadPart"
            done, size = self._upload_parts(bucket, key, upload_id, parts, workers,
                                            md5=retain_until is not None)
            if not done:
                raise UsageError(f"S3 upload of s3://{bucket}/{key}: no parts")
            op = "CompleteMultipartUpload"
            r = self._call(op, bucket, key, self.client.complete_multipart_upload,
                           Bucket=bucket, Key=key, UploadId=upload_id,
                           MultipartUpload={"Parts": done})
        except BaseException as e:
            self._abort(bucket, key, upload_id, e)
            raise
        version = r.get("VersionId")
        if retain_until is not None:
            try:
                self.set_retention(bucket, ObjectRef(key, version), retain_until)
            except BaseException as e:
                self._undo_unlocked(bucket, ObjectRef(key, version), e)
                raise
        return PutResult(key, size, sha256, str(r.get("ETag", "")), version)

    def _upload_parts(
        self, bucket: str, key: str, upload_id: str, parts: Iterable[bytes | bytearray],
        workers: int,
        *, md5: bool,
    ) -> tuple[list[dict[str, Any]], int]:
        """UploadPart each part (numbered from 1), at most ``workers`` at once; the
        (PartNumber, ETag) list in order and the total size."""

        def one(n: int, data: bytes | bytearray) -> dict[str, Any]:
            kw: dict[str, Any] = {"Bucket": bucket, "Key": key, "UploadId": upload_id,
                                  "PartNumber": n, "Body": _body(data)}
            if md5:
                kw["ContentMD5"] = _md5(data)
            r = self._call("UploadPart", bucket, key, self.client.upload_part, **kw)
            return {"PartNumber": n, "ETag": r["ETag"]}

        done: list[dict[str, Any]] = []
        size = 0
        if workers <= 1:
            for n, data in enumerate(parts, 1):
                size += len(data)
                done.append(one(n, data))
            return done, size
        with ThreadPoolExecutor(workers, thread_name_prefix="cdp-s3-part") as pool:
            pending: set[Future[dict[str, Any]]] = set()
            try:
                for n, data in enumerate(parts, 1):
                    size += len(data)
                    if len(pending) >= workers:
                        finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                        done.extend(f.result() for f in finished)
                    pending.add(pool.submit(one, n, data))
                finished, pending = wait(pending)
                done.extend(f.result() for f in finished)
            except BaseException:
                for f in pending:
                    f.cancel()
                raise
        done.sort(key=lambda p: int(p["PartNumber"]))
        return done, size

    def _abort(self, bucket: str, key: str, upload_id: str, cause: BaseException) -> None:
        try:
            self.client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
        except Exception as e:  # the upload stays incomplete: never an object
            log.warning("S3 upload of s3://%s/%s failed (%s) and its abort too (%s): "
                        "abort_incomplete_uploads will free it", bucket, key, cause, e)
            cause.add_note(f"aborting upload {upload_id} failed too: {self.error(e, 'AbortMultipartUpload', bucket, key)}")

    def _undo_unlocked(self, bucket: str, ref: ObjectRef, cause: BaseException) -> None:
        try:
            self.client.delete_object(Bucket=bucket, Key=ref.key,
                                      **({"VersionId": ref.version_id} if ref.version_id else {}))
        except Exception as e:
            cause.add_note(f"s3://{bucket}/{ref.key} (version {ref.version_id}) was stored but "
                           f"not locked, and deleting it failed: "
                           f"{self.error(e, 'DeleteObject', bucket, ref.key)}")

    def upload_file(
        self,
        bucket: str,
        key: str,
        path: Path,
        *,
        sha256: str | None = None,
        part_size: int = DEFAULT_PART,
        retain_until: datetime | None = None,
        workers: int = 1,
    ) -> PutResult:
        """Upload a file that does not change (a sealed segment): one PUT up to
        ``part_size``, else :meth:`put_multipart` reading ``part_size`` at a time. Without
        ``sha256`` the file is read once more to compute it first."""
        if part_size < MIN_PART:
            raise UsageError(f"part_size {part_size} is below S3's minimum of {MIN_PART}")
        size = path.stat().st_size
        if size <= part_size:
            return self.put_object(bucket, key, path.read_bytes(), sha256=sha256,
                                   retain_until=retain_until)
        if sha256 is None:
            sha256 = file_sha256(path)
        with open(path, "rb") as f:
            fd = f.fileno()

            def parts() -> Iterator[bytes]:
                for off in range(0, size, part_size):
                    data = os.pread(fd, min(part_size, size - off), off)
                    if len(data) != min(part_size, size - off):
                        raise UsageError(f"{path} shrank while being uploaded to s3://{bucket}/{key}")
                    yield data

            r = self.put_multipart(bucket, key, parts(), sha256=sha256, retain_until=retain_until,
                                   workers=workers)
        if r.size != size:
            raise UsageError(f"{path} changed while being uploaded to s3://{bucket}/{key}")
        return r

    def set_retention(self, bucket: str, ref: ObjectRef, until: datetime) -> None:
        """COMPLIANCE retention of one object version until ``until`` (may extend, never
        shorten one)."""
        kw: dict[str, Any] = {"Bucket": bucket, "Key": ref.key,
                              "Retention": {"Mode": "COMPLIANCE", "RetainUntilDate": until}}
        if ref.version_id:
            kw["VersionId"] = ref.version_id
        self._call("PutObjectRetention", bucket, ref.key, self.client.put_object_retention, **kw)

    def abort_incomplete_uploads(self, bucket: str, prefix: str = "") -> int:
        """Abort every incomplete multipart upload under ``prefix`` (left by a crash); how
        many. Only when no upload under that prefix is running (at tier start)."""
        n = 0
        pages = self.client.get_paginator("list_multipart_uploads").paginate(
            Bucket=bucket, Prefix=prefix)
        try:
            for page in pages:
                for u in page.get("Uploads", []):
                    self.client.abort_multipart_upload(Bucket=bucket, Key=u["Key"],
                                                       UploadId=u["UploadId"])
                    n += 1
        except Exception as e:
            raise self.error(e, "AbortMultipartUpload", bucket, prefix) from e
        return n

    # ---- reads
    def get_range(
        self, bucket: str, key: str, start: int, length: int, *, version_id: str | None = None
    ) -> bytes:
        """Bytes ``[start, start + length)`` of an object (fewer if it ends before);
        OutOfRange if ``start`` is at or past its end. One GET; a cut body is retried."""
        if start < 0 or length <= 0:
            raise UsageError(f"bad range start={start} length={length}")
        kw: dict[str, Any] = {"Range": f"bytes={start}-{start + length - 1}"}
        if version_id:
            kw["VersionId"] = version_id
        return self._read("GetObject", bucket, key, kw)[1]

    def get_object(self, bucket: str, key: str, *, version_id: str | None = None) -> bytes:
        """A whole (small) object, in memory; a cut body is retried."""
        kw: dict[str, Any] = {"VersionId": version_id} if version_id else {}
        return self._read("GetObject", bucket, key, kw)[1]

    def head(self, bucket: str, key: str, *, version_id: str | None = None) -> ObjectInfo:
        """HEAD: size, ETag, version, the sha256 of its metadata, lock mode and date."""
        kw: dict[str, Any] = {"Bucket": bucket, "Key": key}
        if version_id:
            kw["VersionId"] = version_id
        r = self._call("HeadObject", bucket, key, self.client.head_object, **kw)
        return ObjectInfo(
            key=key, size=int(r["ContentLength"]), etag=str(r.get("ETag", "")),
            last_modified=r.get("LastModified"), version_id=r.get("VersionId"),
            sha256=(r.get("Metadata") or {}).get(SHA256_META), lock_mode=r.get("ObjectLockMode"),
            retain_until=r.get("ObjectLockRetainUntilDate"),
        )

    def list_objects(self, bucket: str, prefix: str = "", *, page_size: int = 1000) -> Iterator[ObjectInfo]:
        """Every current object under ``prefix``, in key order (ListObjectsV2, one request
        per ``page_size`` keys, fetched as the iterator advances)."""
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix=prefix, PaginationConfig={"PageSize": page_size})
        try:
            for page in pages:
                for o in page.get("Contents", []):
                    yield ObjectInfo(key=o["Key"], size=int(o["Size"]), etag=str(o.get("ETag", "")),
                                     last_modified=o.get("LastModified"))
        except CdpError:
            raise
        except Exception as e:
            raise self.error(e, "ListObjectsV2", bucket, prefix) from e

    def list_versions(self, bucket: str, prefix: str = "", *, page_size: int = 1000) -> Iterator[ObjectInfo]:
        """Every version and delete marker under ``prefix`` (ListObjectVersions): what a
        gc of a versioned (object-locked) bucket deletes by :class:`ObjectRef`."""
        pages = self.client.get_paginator("list_object_versions").paginate(
            Bucket=bucket, Prefix=prefix, PaginationConfig={"PageSize": page_size})
        try:
            for page in pages:
                for o in page.get("Versions", []):
                    yield ObjectInfo(key=o["Key"], size=int(o["Size"]), etag=str(o.get("ETag", "")),
                                     last_modified=o.get("LastModified"),
                                     version_id=o.get("VersionId"), is_latest=bool(o.get("IsLatest")))
                for o in page.get("DeleteMarkers", []):
                    yield ObjectInfo(key=o["Key"], size=0, etag="", last_modified=o.get("LastModified"),
                                     version_id=o.get("VersionId"), delete_marker=True,
                                     is_latest=bool(o.get("IsLatest")))
        except CdpError:
            raise
        except Exception as e:
            raise self.error(e, "ListObjectVersions", bucket, prefix) from e

    # ---- deletes
    def delete_objects(
        self, bucket: str, refs: Iterable[str | ObjectRef], *, batch: int = DELETE_BATCH
    ) -> DeleteResult:
        """Delete objects, ``batch`` per DeleteObjects request. What the store refuses
        (``AccessDenied`` for a version under retention) is listed in ``refused``, not
        raised; a request that fails as a whole raises. In a versioned bucket a ref
        without ``version_id`` only adds a delete marker."""
        out = DeleteResult()
        todo = [r if isinstance(r, ObjectRef) else ObjectRef(r) for r in refs]
        for i in range(0, len(todo), max(1, min(batch, DELETE_BATCH))):
            chunk = todo[i:i + max(1, min(batch, DELETE_BATCH))]
            objs = [{"Key": r.key, **({"VersionId": r.version_id} if r.version_id else {})}
                    for r in chunk]
            resp = self._call("DeleteObjects", bucket, chunk[0].key, self.client.delete_objects,
                              Bucket=bucket, Delete={"Objects": objs, "Quiet": True})
            failed: dict[tuple[str, str | None], DeleteRefusal] = {}
            for e in resp.get("Errors", []):
                ref = ObjectRef(e["Key"], e.get("VersionId") or None)
                failed[(ref.key, ref.version_id)] = DeleteRefusal(
                    ref, str(e.get("Code", "?")), str(e.get("Message") or ""))
            for r in chunk:
                refusal = failed.get((r.key, r.version_id))
                if refusal is None:
                    out.deleted.append(r)
                else:
                    out.refused.append(refusal)
        return out


# -- helpers ------------------------------------------------------------------------------


def _lock_args(until: datetime) -> dict[str, Any]:
    if until.tzinfo is None:
        raise UsageError(f"retain_until {until} has no time zone")
    return {"ObjectLockMode": "COMPLIANCE", "ObjectLockRetainUntilDate": until}


#: request bodies whose sha256 is known, by id: (the body itself, hex digest). Entries
#: live for one call (:func:`_known_payload`); the identity check makes a reused id safe.
_KNOWN: dict[int, tuple[bytearray, str]] = {}
#: the signature version this module registers for :class:`_KnownPayloadAuth`
KNOWN_PAYLOAD_SIGNER = "cdp-s3v4"


@contextmanager
def _known_payload(body: bytearray, digest: str) -> Iterator[None]:
    """Within the block, a request whose body is ``body`` signs ``digest`` as its payload
    hash instead of hashing the body (on clients of :class:`S3`)."""
    _KNOWN[id(body)] = (body, digest)
    try:
        yield
    finally:
        _KNOWN.pop(id(body), None)


@cache
def _known_payload_auth() -> type:
    """botocore's S3 SigV4 signer, but a body registered by :func:`_known_payload` is
    not hashed: its known digest is the payload hash. Registered once under
    :data:`KNOWN_PAYLOAD_SIGNER` (a name of its own: other clients keep ``s3v4``)."""
    import botocore.auth

    class _KnownPayloadAuth(botocore.auth.S3SigV4Auth):  # type: ignore[misc]
        def payload(self, request: Any) -> str:
            body = request.body
            known = _KNOWN.get(id(body))
            if known is None or known[0] is not body or self._is_streaming_checksum_payload(request):
                return str(super().payload(request))
            return known[1]

    botocore.auth.AUTH_TYPE_MAPS[KNOWN_PAYLOAD_SIGNER] = _KnownPayloadAuth
    return _KnownPayloadAuth


def _choose_known_signer(signature_version: Any = None, **_kw: Any) -> str | None:
    """``choose-signer`` handler: plain S3 SigV4 becomes :data:`KNOWN_PAYLOAD_SIGNER`."""
    return KNOWN_PAYLOAD_SIGNER if signature_version == "s3v4" else None


def _sign_known_payloads(client: Any) -> None:
    """Make ``client``'s PutObject sign known payload hashes (:func:`_known_payload`);
    idempotent. Other operations and other clients are unchanged."""
    _known_payload_auth()
    client.meta.events.register_first("choose-signer.s3.PutObject", _choose_known_signer,
                                       unique_id="cdp-known-payload-put")


def _body(data: bytes | bytearray) -> bytearray:
    """A request body as botocore sends it in one piece (see the design notes): a
    bytearray (``data`` itself if it is one, else a copy: ~1 ms per 8 MiB)."""
    return data if isinstance(data, bytearray) else bytearray(data)


def _md5(data: bytes | bytearray) -> str:
    return base64.b64encode(hashlib.md5(data, usedforsecurity=False).digest()).decode()


def file_sha256(path: Path, chunk: int = 4 * MiB) -> str:
    """Hex sha256 of a file, read ``chunk`` at a time."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()
