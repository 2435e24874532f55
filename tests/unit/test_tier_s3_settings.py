"""cdp.tier.s3 without a server: url parsing, the credentials file rules, the client's
settings, and how botocore errors map to cdp's (the real-RGW tests are in tests/s3/)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
from botocore.awsrequest import AWSPreparedRequest, AWSResponse
from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

from cdp.errors import ConfigError, NotFound, OutOfRange, RemoteRefused, RemoteUnreachable
from cdp.tier.s3 import S3, S3Settings, client_config, load_credentials_file, parse_s3_url


def test_parse_s3_url() -> None:
    assert parse_s3_url("s3://bkt/a/b") == ("bkt", "a/b/")
    assert parse_s3_url("s3://bkt/a/b/") == ("bkt", "a/b/")
    assert parse_s3_url("s3://bkt") == ("bkt", "")
    for bad in ("http://bkt/x", "s3:///x", "s3://b_k/x", "bkt/x"):
        with pytest.raises(ConfigError, match="tier url"):
            parse_s3_url(bad)


def test_credentials_file(tmp_path: Path) -> None:
    f = tmp_path / "cred"
    f.write_text("[default]\naws_access_key_id = AK\naws_secret_access_key = SK\n")
    f.chmod(0o600)
    assert load_credentials_file(f) == ("AK", "SK", None)
    f.chmod(0o604)
    with pytest.raises(ConfigError, match=rf"credentials_file {f} is readable by group or other \(mode 0604\)"):
        load_credentials_file(f)
    f.chmod(0o400)
    assert load_credentials_file(f)[0] == "AK"
    f.chmod(0o600)
    f.write_text("[cdp]\naws_access_key_id = AK\naws_secret_access_key = SK\naws_session_token = T\n")
    assert load_credentials_file(f) == ("AK", "SK", "T")  # the only section
    f.write_text("[default]\naws_access_key_id = AK\n")
    with pytest.raises(ConfigError, match=r"\[default\] has no aws_secret_access_key"):
        load_credentials_file(f)
    f.write_text("not ini")
    with pytest.raises(ConfigError, match="not an AWS credentials file"):
        load_credentials_file(f)
    with pytest.raises(ConfigError, match="no such file"):
        load_credentials_file(tmp_path / "absent")


def test_client_config() -> None:
    c = client_config(S3Settings(max_attempts=4, connect_timeout=2, read_timeout=9))
    assert c.s3 == {"addressing_style": "path"}
    assert c.signature_version == "s3v4"
    assert c.request_checksum_calculation == "when_required"
    assert c.response_checksum_validation == "when_required"
    assert c.retries == {"mode": "standard", "total_max_attempts": 4}
    assert (c.connect_timeout, c.read_timeout) == (2, 9)


@pytest.fixture(scope="module")
def offline() -> S3:
    """A client of an endpoint nobody serves (the mapping needs no server)."""
    return S3(S3Settings(endpoint="http://127.0.0.1:9", max_attempts=2))


def _client_error(code: str, status: int, op: str = "GetObject") -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": "msg"},
                        "ResponseMetadata": {"HTTPStatusCode": status, "RetryAttempts": 2}}, op)


@pytest.mark.parametrize(("code", "status", "cls", "words"), [
    ("NoSuchKey", 404, NotFound, "no such object"),
    ("404", 404, NotFound, "no such object"),
    ("NoSuchBucket", 404, NotFound, "no such bucket"),
    ("InvalidRange", 416, OutOfRange, "range outside"),
    ("AccessDenied", 403, RemoteRefused, "refused: 403 AccessDenied"),
    ("InvalidAccessKeyId", 403, RemoteRefused, "check the credentials"),
    ("InvalidArgument", 400, RemoteRefused, "refused: 400 InvalidArgument"),
    ("ServiceUnavailable", 503, RemoteUnreachable, "after 3 attempt(s)"),
    ("InternalError", 500, RemoteUnreachable, "500 InternalError"),
])
def test_error_mapping(offline: S3, code: str, status: int, cls: type, words: str) -> None:
    e = offline.error(_client_error(code, status), "GetObject", "bkt", "k/1")
    assert isinstance(e, cls)
    assert str(e).startswith("S3 GetObject s3://bkt/k/1 at http://127.0.0.1:9: ")
    assert words in str(e)


def test_error_mapping_transport_and_credentials(offline: S3) -> None:
    e = offline.error(EndpointConnectionError(endpoint_url="http://127.0.0.1:9"), "PutObject", "b", "k")
    assert isinstance(e, RemoteUnreachable) and "unreachable after 2 attempt(s)" in str(e)
    e = offline.error(NoCredentialsError(), "PutObject", "b", "k")
    assert isinstance(e, ConfigError) and "credentials_file" in str(e)


class _Raw:
    """The raw stream of a canned empty response."""

    def stream(self, **_kw: object) -> Iterator[bytes]:
        return iter([b""])


def test_upload_bodies_go_as_one_buffer() -> None:
    """PutObject and UploadPart bodies reach the HTTP layer as one bytearray: signed by
    one sha256 of the whole body, sent by one sendall, no 100-continue round trip
    (a bytes body would become a BytesIO, hashed and sent in small reads holding the GIL)."""
    client = boto3.session.Session(aws_access_key_id="AK", aws_secret_access_key="SK").client(
        "s3", endpoint_url="http://127.0.0.1:9", region_name="us-east-1",
        config=client_config(S3Settings()))
    sent: list[AWSPreparedRequest] = []

    def capture(request: AWSPreparedRequest, **_kw: object) -> AWSResponse:
        sent.append(request)
        headers = {"ETag": '"e"'} if request.method == "PUT" else {}
        return AWSResponse(request.url, 200, headers, _Raw())

    client.meta.events.register("before-send.s3", capture)
    s3 = S3(S3Settings(endpoint="http://127.0.0.1:9"), client=client)
    data = bytes(range(256)) * 4096  # 1 MiB
    s3.put_object("b", "k", data)
    s3._upload_parts("b", "k", "up", iter([data, data[:5]]), 1, md5=False)
    assert [r.method for r in sent] == ["PUT", "PUT", "PUT"]
    for r, body in zip(sent, (data, data, data[:5]), strict=True):
        assert type(r.body) is bytearray and r.body == body
        assert "Expect" not in r.headers
        assert r.headers["X-Amz-Content-SHA256"] == hashlib.sha256(body).hexdigest().encode()
