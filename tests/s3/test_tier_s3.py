"""cdp.tier.s3 against the real test RGW (no fake): writes with sha256 and object lock,
multipart all-or-nothing, ranged reads, listing, deletes refused under lock, and faults
through the fault proxy (retried, then a clear cdp error naming bucket, key, endpoint)."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import boto3
import pytest

from cdp.errors import ConfigError, NotFound, OutOfRange, RemoteRefused, RemoteUnreachable
from cdp.tier.s3 import MIN_PART, S3, ObjectRef, S3Settings, client_config, file_sha256
from tests.s3.fault_proxy import FaultProxy
from tests.s3.rgw import Rgw

MiB = 1 << 20


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def test_put_head_get_range(s3: S3, s3_bucket: str) -> None:
    data = os.urandom(300_000)
    r = s3.put_object(s3_bucket, "a/seg1", data)
    assert (r.size, r.sha256) == (len(data), sha(data))
    h = s3.head(s3_bucket, "a/seg1")
    assert (h.size, h.sha256, h.lock_mode) == (len(data), sha(data), None)
    assert s3.get_range(s3_bucket, "a/seg1", 4096, 4096) == data[4096:8192]
    assert s3.get_range(s3_bucket, "a/seg1", len(data) - 10, 4096) == data[-10:]  # ends early
    assert s3.get_object(s3_bucket, "a/seg1") == data
    with pytest.raises(OutOfRange, match=f"s3://{s3_bucket}/a/seg1"):
        s3.get_range(s3_bucket, "a/seg1", len(data), 10)


def test_put_signs_its_known_sha256_instead_of_hashing_again(
    s3: S3, s3_bucket: str, rgw: Rgw, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A PUT body is hashed once (by cdp, for the metadata and key), not a second time by
    botocore for SigV4: the known digest is the signed payload hash. Other clients of the
    same process (a plain boto3 client) still hash their bodies themselves."""
    import botocore.auth

    hashed: list[int] = []
    real = botocore.auth.sha256

    def spy(data: bytes = b"") -> Any:
        hashed.append(len(data))
        return real(data)

    monkeypatch.setattr(botocore.auth, "sha256", spy)
    data = os.urandom(3 * MiB)
    s3.put_object(s3_bucket, "h/given", data, sha256=sha(data))
    s3.put_object(s3_bucket, "h/computed", data)  # cdp hashes it for the metadata
    assert len(data) not in hashed
    for key in ("h/given", "h/computed"):
        assert s3.head(s3_bucket, key).sha256 == sha(data)
        assert s3.get_object(s3_bucket, key) == data
    plain = boto3.session.Session().client(
        "s3", endpoint_url=s3.endpoint, region_name="us-east-1",
        aws_access_key_id=rgw.access_key, aws_secret_access_key=rgw.secret_key,
        config=client_config(s3.settings))
    plain.put_object(Bucket=s3_bucket, Key="h/plain", Body=bytearray(data))
    assert len(data) in hashed  # the spy sees botocore's own hashing


def test_a_sha256_that_is_not_the_body_is_refused(s3: S3, s3_bucket: str) -> None:
    """The signed payload hash is the one cdp names the object by: a body that does not
    match it is refused by the store, never stored under that name."""
    data = os.urandom(MiB)
    wrong = sha(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(RemoteRefused, match=f"s3://{s3_bucket}/h/bad.*SHA256"):
        s3.put_object(s3_bucket, "h/bad", data, sha256=wrong)
    with pytest.raises(NotFound):
        s3.head(s3_bucket, "h/bad")


def test_missing_key_and_bucket_are_not_found(s3: S3, s3_bucket: str, rgw: Rgw) -> None:
    with pytest.raises(NotFound, match=f"s3://{s3_bucket}/nope at {rgw.endpoint}"):
        s3.head(s3_bucket, "nope")
    with pytest.raises(NotFound, match="no such object"):
        s3.get_range(s3_bucket, "nope", 0, 10)
    with pytest.raises(NotFound, match="no such bucket"):
        s3.put_object(s3_bucket + "-absent", "k", b"x")


def test_list_is_paginated_and_ordered(s3: S3, s3_bucket: str) -> None:
    keys = [f"p/{i:04d}" for i in range(23)]
    for k in keys:
        s3.put_object(s3_bucket, k, k.encode())
    s3.put_object(s3_bucket, "other/x", b"x")
    got = list(s3.list_objects(s3_bucket, "p/", page_size=5))
    assert [o.key for o in got] == keys
    assert all(o.size == 6 for o in got)


def test_delete_objects_in_batches(s3: S3, s3_bucket: str) -> None:
    for i in range(7):
        s3.put_object(s3_bucket, f"d/{i}", b"x")
    res = s3.delete_objects(s3_bucket, [f"d/{i}" for i in range(7)], batch=3)
    assert len(res.deleted) == 7 and res.refused == []
    assert list(s3.list_objects(s3_bucket, "d/")) == []


def test_multipart_upload_file(s3: S3, s3_bucket: str, tmp_path: Path) -> None:
    data = os.urandom(3 * MIN_PART + 12345)
    f = tmp_path / "seg"
    f.write_bytes(data)
    r = s3.upload_file(s3_bucket, "m/seg", f, part_size=MIN_PART, workers=2)
    assert (r.size, r.sha256) == (len(data), sha(data)) and r.sha256 == file_sha256(f)
    h = s3.head(s3_bucket, "m/seg")
    assert (h.size, h.sha256) == (len(data), sha(data))
    edge = MIN_PART - 100  # across a part boundary
    assert s3.get_range(s3_bucket, "m/seg", edge, 200) == data[edge:edge + 200]
    assert s3.get_object(s3_bucket, "m/seg") == data
    small = tmp_path / "small"
    small.write_bytes(b"tiny")
    assert s3.upload_file(s3_bucket, "m/small", small).size == 4  # one PUT


def test_failed_multipart_leaves_nothing(s3: S3, s3_bucket: str) -> None:
    def parts() -> Iterator[bytes]:
        yield os.urandom(MIN_PART)
        raise RuntimeError("source failed")

    with pytest.raises(RuntimeError, match="source failed"):
        s3.put_multipart(s3_bucket, "m/broken", parts(), sha256="0" * 64)
    with pytest.raises(NotFound):
        s3.head(s3_bucket, "m/broken")
    assert s3.client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []


def test_failed_part_upload_aborts(rgw: Rgw, s3_bucket: str, s3_fault_proxy: FaultProxy) -> None:
    s3 = rgw.s3(s3_fault_proxy.endpoint, max_attempts=2)
    s3_fault_proxy.set_mode("503", times=2, match="partNumber=2")  # both attempts of part 2
    parts = [os.urandom(MIN_PART), os.urandom(MIN_PART), b"tail"]
    with pytest.raises(RemoteUnreachable, match=rf"UploadPart s3://{s3_bucket}/m/x at {s3_fault_proxy.endpoint}.*503"):
        s3.put_multipart(s3_bucket, "m/x", iter(parts), sha256=sha(b"".join(parts)))
    with pytest.raises(NotFound):
        s3.head(s3_bucket, "m/x")
    assert s3.client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []


def test_abort_incomplete_uploads(s3: S3, s3_bucket: str) -> None:
    s3.client.create_multipart_upload(Bucket=s3_bucket, Key="crash/a")  # as after a kill -9
    s3.client.create_multipart_upload(Bucket=s3_bucket, Key="other/b")
    assert s3.abort_incomplete_uploads(s3_bucket, "crash/") == 1
    left = s3.client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", [])
    assert [u["Key"] for u in left] == ["other/b"]


def test_object_lock_refuses_early_delete(s3: S3, s3_locked_bucket: str, tmp_path: Path) -> None:
    until = datetime.now(UTC) + timedelta(seconds=30)
    s3.require_object_lock(s3_locked_bucket)
    r = s3.put_object(s3_locked_bucket, "l/one", b"locked", retain_until=until)
    f = tmp_path / "big"
    f.write_bytes(os.urandom(MIN_PART + 1))
    m = s3.upload_file(s3_locked_bucket, "l/multi", f, part_size=MIN_PART, retain_until=until)
    for key, res in (("l/one", r), ("l/multi", m)):
        h = s3.head(s3_locked_bucket, key)
        assert h.lock_mode == "COMPLIANCE" and h.retain_until is not None
        assert abs((h.retain_until - until).total_seconds()) < 1.5
        assert h.version_id == res.version_id is not None
    refs = [ObjectRef("l/one", r.version_id), ObjectRef("l/multi", m.version_id)]
    res = s3.delete_objects(s3_locked_bucket, refs)
    assert res.deleted == [] and [x.ref for x in res.refused] == refs
    assert {x.code for x in res.refused} == {"AccessDenied"}
    assert s3.get_object(s3_locked_bucket, "l/one") == b"locked"  # still there


def test_object_lock_expired_delete_works(s3: S3, s3_locked_bucket: str) -> None:
    until = datetime.now(UTC) + timedelta(seconds=2)
    r = s3.put_object(s3_locked_bucket, "l/short", b"x", retain_until=until)
    ref = ObjectRef("l/short", r.version_id)
    assert s3.delete_objects(s3_locked_bucket, [ref]).refused
    time.sleep(max(0.0, (until - datetime.now(UTC)).total_seconds()) + 1.5)
    res = s3.delete_objects(s3_locked_bucket, [ref])
    assert res.deleted == [ref] and not res.refused


def test_require_object_lock(s3: S3, s3_bucket: str, rgw: Rgw) -> None:
    with pytest.raises(ConfigError, match=f"bucket '{s3_bucket}' at {rgw.endpoint} does not have object lock"):
        s3.require_object_lock(s3_bucket)
    with pytest.raises(NotFound, match="no such bucket"):
        s3.require_object_lock(s3_bucket + "-absent")


def test_wrong_credentials_are_refused(rgw: Rgw, s3_bucket: str, tmp_path: Path) -> None:
    cred = tmp_path / "cred"
    cred.write_text(f"[default]\naws_access_key_id = {rgw.access_key}\naws_secret_access_key = wrong\n")
    cred.chmod(0o600)
    bad = S3(S3Settings(endpoint=rgw.endpoint, credentials_file=cred, max_attempts=2))
    with pytest.raises(RemoteRefused, match=f"s3://{s3_bucket}/k at {rgw.endpoint}: refused: 403 SignatureDoesNotMatch"):
        bad.put_object(s3_bucket, "k", b"x")
    cred.write_text(f"[default]\naws_access_key_id = {rgw.access_key}\n"
                    f"aws_secret_access_key = {rgw.secret_key}\n")
    good = S3(S3Settings(endpoint=rgw.endpoint, credentials_file=cred))
    assert good.put_object(s3_bucket, "k", b"x").size == 1
    cred.chmod(0o640)
    with pytest.raises(ConfigError, match=rf"{cred} is readable by group or other \(mode 0640\)"):
        S3(S3Settings(endpoint=rgw.endpoint, credentials_file=cred))


def test_unreachable_endpoint(rgw: Rgw) -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    s3 = rgw.s3(f"http://127.0.0.1:{port}", max_attempts=2)
    with pytest.raises(RemoteUnreachable, match=f"s3://b/k at http://127.0.0.1:{port}: unreachable"):
        s3.head("b", "k")


def test_503_is_retried_then_a_clear_error(rgw: Rgw, s3_bucket: str, s3_fault_proxy: FaultProxy) -> None:
    s3 = rgw.s3(s3_fault_proxy.endpoint, max_attempts=3)
    s3_fault_proxy.set_mode("503", times=2)
    assert s3.put_object(s3_bucket, "k", b"data").size == 4  # third attempt passes
    assert s3_fault_proxy.requests == 3
    s3_fault_proxy.set_mode("503")
    with pytest.raises(RemoteUnreachable) as e:
        s3.get_range(s3_bucket, "k", 0, 4)
    msg = str(e.value)
    assert f"GetObject s3://{s3_bucket}/k at {s3_fault_proxy.endpoint}" in msg
    assert "503 ServiceUnavailable" in msg and "after 3 attempt(s)" in msg


def test_cut_body_is_retried_then_a_clear_error(rgw: Rgw, s3_bucket: str, s3_fault_proxy: FaultProxy) -> None:
    s3 = rgw.s3(s3_fault_proxy.endpoint, max_attempts=3)
    data = os.urandom(64 * 1024)
    s3.put_object(s3_bucket, "k", data)
    s3_fault_proxy.set_mode("cut", cut_after=100, times=2, match="GET ")
    assert s3.get_range(s3_bucket, "k", 1000, 50_000) == data[1000:51_000]
    assert s3_fault_proxy.faults == 2
    s3_fault_proxy.set_mode("cut", cut_after=100, match="GET ")
    with pytest.raises(RemoteUnreachable, match=f"GetObject s3://{s3_bucket}/k at {s3_fault_proxy.endpoint}: the response body was cut"):
        s3.get_object(s3_bucket, "k")


def test_timeout_and_drop_are_unreachable(rgw: Rgw, s3_bucket: str, s3_fault_proxy: FaultProxy) -> None:
    s3 = rgw.s3(s3_fault_proxy.endpoint, max_attempts=2, read_timeout=0.5)
    s3.put_object(s3_bucket, "k", b"x")
    s3_fault_proxy.set_mode("delay", delay=2.0)
    with pytest.raises(RemoteUnreachable, match="unreachable after 2 attempt"):
        s3.head(s3_bucket, "k")
    s3_fault_proxy.set_mode("drop")
    with pytest.raises(RemoteUnreachable, match=f"s3://{s3_bucket}/k"):
        s3.put_object(s3_bucket, "k2", b"x")
    s3_fault_proxy.set_mode("pass")
    assert s3.head(s3_bucket, "k").size == 1
