"""The fault proxy itself, driven through plain boto3 against the test RGW: each mode does
what it says, and modes switch at run time without a restart."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import (
    ClientError,
    ConnectionClosedError,
    EndpointConnectionError,
    IncompleteReadError,
    ReadTimeoutError,
    ResponseStreamingError,
)

from tests.s3.fault_proxy import FaultProxy
from tests.s3.rgw import Rgw, drop_bucket, new_bucket


def raw_client(rgw: Rgw, endpoint: str, *, read_timeout: float = 10.0) -> Any:
    """Plain boto3, one attempt per call: every fault reaches the test."""
    return boto3.session.Session().client(
        "s3", endpoint_url=endpoint, region_name="us-east-1",
        aws_access_key_id=rgw.access_key, aws_secret_access_key=rgw.secret_key,
        config=Config(s3={"addressing_style": "path"}, signature_version="s3v4",
                      request_checksum_calculation="when_required",
                      response_checksum_validation="when_required",
                      retries={"mode": "standard", "total_max_attempts": 1},
                      connect_timeout=5, read_timeout=read_timeout),
    )


@pytest.fixture
def bucket(rgw: Rgw) -> Iterator[str]:
    s3 = rgw.s3()
    name = new_bucket(s3)
    s3.client.put_object(Bucket=name, Key="blob", Body=bytes(range(256)) * 1024)  # 256 KiB
    yield name
    drop_bucket(s3, name)


BLOB = bytes(range(256)) * 1024


def test_pass_forwards_requests_and_bodies(rgw: Rgw, s3_fault_proxy: FaultProxy, bucket: str) -> None:
    c = raw_client(rgw, s3_fault_proxy.endpoint)
    data = bytes(7) * (3 << 20)  # a body larger than the proxy's buffers
    c.put_object(Bucket=bucket, Key="big", Body=data)
    assert c.get_object(Bucket=bucket, Key="big")["Body"].read() == data
    got = c.get_object(Bucket=bucket, Key="blob", Range="bytes=4096-8191")["Body"].read()
    assert got == BLOB[4096:8192]
    assert c.head_object(Bucket=bucket, Key="blob")["ContentLength"] == len(BLOB)
    assert s3_fault_proxy.requests == 4 and s3_fault_proxy.faults == 0


def test_503_is_a_wellformed_s3_error(rgw: Rgw, s3_fault_proxy: FaultProxy, bucket: str) -> None:
    c = raw_client(rgw, s3_fault_proxy.endpoint)
    s3_fault_proxy.set_mode("503")
    with pytest.raises(ClientError) as e:
        c.get_object(Bucket=bucket, Key="blob")
    err = e.value.response
    assert err["ResponseMetadata"]["HTTPStatusCode"] == 503
    assert err["Error"]["Code"] == "ServiceUnavailable"
    assert "fault proxy" in err["Error"]["Message"]
    # a PUT with a body (the proxy reads it before answering) and a HEAD (no body)
    with pytest.raises(ClientError) as e:
        c.put_object(Bucket=bucket, Key="x", Body=b"y" * 100_000)
    assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 503
    with pytest.raises(ClientError) as e:
        c.head_object(Bucket=bucket, Key="blob")
    assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 503
    s3_fault_proxy.set_mode("pass")  # switched at run time, same proxy
    assert c.get_object(Bucket=bucket, Key="blob")["Body"].read() == BLOB
    assert s3_fault_proxy.faults == 3


def test_times_and_match_limit_the_fault(rgw: Rgw, s3_fault_proxy: FaultProxy, bucket: str) -> None:
    c = raw_client(rgw, s3_fault_proxy.endpoint)
    s3_fault_proxy.set_mode("503", times=1, match="PUT ")
    c.get_object(Bucket=bucket, Key="blob")["Body"].read()  # GET passes
    with pytest.raises(ClientError):
        c.put_object(Bucket=bucket, Key="x", Body=b"1")
    c.put_object(Bucket=bucket, Key="x", Body=b"2")  # times used up
    assert s3_fault_proxy.faults == 1 and s3_fault_proxy.requests == 3


def test_drop_closes_without_an_answer(rgw: Rgw, s3_fault_proxy: FaultProxy, bucket: str) -> None:
    c = raw_client(rgw, s3_fault_proxy.endpoint)
    s3_fault_proxy.set_mode("drop")
    with pytest.raises((ConnectionClosedError, EndpointConnectionError)):
        c.get_object(Bucket=bucket, Key="blob")


def test_hold_never_answers_until_the_mode_changes(
        rgw: Rgw, s3_fault_proxy: FaultProxy, bucket: str) -> None:
    s3_fault_proxy.set_mode("hold")
    got: list[Exception] = []

    def get() -> None:
        c = raw_client(rgw, s3_fault_proxy.endpoint, read_timeout=600)
        try:
            c.get_object(Bucket=bucket, Key="blob")
        except Exception as e:  # recorded for the assertion below
            got.append(e)

    t = threading.Thread(target=get, daemon=True)
    t.start()
    deadline = time.monotonic() + 30
    while s3_fault_proxy.held == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert s3_fault_proxy.held == 1 and t.is_alive()  # the request waits, unanswered
    s3_fault_proxy.set_mode("pass")  # the held connection is closed: the client sees it end
    t.join(60)
    assert not t.is_alive() and s3_fault_proxy.held == 0
    assert got and isinstance(got[0], (ConnectionClosedError, EndpointConnectionError)), got
    c = raw_client(rgw, s3_fault_proxy.endpoint)
    assert c.get_object(Bucket=bucket, Key="blob")["Body"].read() == BLOB


def test_delay_holds_the_request(rgw: Rgw, s3_fault_proxy: FaultProxy, bucket: str) -> None:
    s3_fault_proxy.set_mode("delay", delay=0.5)
    c = raw_client(rgw, s3_fault_proxy.endpoint)
    t0 = time.monotonic()
    assert c.get_object(Bucket=bucket, Key="blob")["Body"].read() == BLOB
    assert time.monotonic() - t0 >= 0.5
    s3_fault_proxy.set_mode("delay", delay=3.0)
    slow = raw_client(rgw, s3_fault_proxy.endpoint, read_timeout=0.5)
    with pytest.raises(ReadTimeoutError):
        slow.get_object(Bucket=bucket, Key="blob")


def test_cut_ends_the_body_early(rgw: Rgw, s3_fault_proxy: FaultProxy, bucket: str) -> None:
    c = raw_client(rgw, s3_fault_proxy.endpoint)
    s3_fault_proxy.set_mode("cut", cut_after=1000)
    body = c.get_object(Bucket=bucket, Key="blob")["Body"]
    with pytest.raises((IncompleteReadError, ResponseStreamingError)):
        body.read()
    s3_fault_proxy.set_mode("cut", cut_after=0)  # right after the headers
    body = c.get_object(Bucket=bucket, Key="blob")["Body"]
    with pytest.raises((IncompleteReadError, ResponseStreamingError)):
        body.read()
