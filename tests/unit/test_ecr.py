"""ECR's token format, the refresh schedule, and failure words safe to show (no secrets)."""

from __future__ import annotations

import base64
import logging
import subprocess
import sys

import pytest
from botocore.exceptions import (
    ClientError,
    ConnectTimeoutError,
    CredentialRetrievalError,
    EndpointConnectionError,
    NoCredentialsError,
    ReadTimeoutError,
)

from mirror.config import UpstreamConfig
from mirror.upstream.credentials import Credentials
from mirror.upstream.ecr import (
    MIN_REFRESH_INTERVAL,
    REFRESH_MARGIN,
    AwsFailure,
    aws_call_timeout,
    decode_token,
    describe_failure,
    ecr_host_region,
    refresh_delay,
)


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def test_decode_token() -> None:
    creds = decode_token(b64("AWS:eyJwYXlsb2FkIjoi:with:colons"))
    assert creds == Credentials("AWS", "eyJwYXlsb2FkIjoi:with:colons")
    assert creds.basic() == "Basic " + b64("AWS:eyJwYXlsb2FkIjoi:with:colons")


@pytest.mark.parametrize(
    "token",
    ["", "not base64!", b64("no-colon"), b64("AWS:"), b64(":password"), "//79"],  # last: not UTF-8
)
def test_unreadable_tokens_are_refused_without_being_repeated(token: str) -> None:
    with pytest.raises(AwsFailure) as caught:
        decode_token(token)
    assert str(caught.value) == "GetAuthorizationToken returned an unreadable token"


@pytest.mark.parametrize(
    ("expires_in", "delay"),
    [
        (12 * 3600.0, 11 * 3600.0),  # a fresh 12 h token: asked again with an hour left
        (2 * 3600.0, 3600.0),
        (REFRESH_MARGIN + 60.0, MIN_REFRESH_INTERVAL),  # never sooner than the floor ...
        (30.0, MIN_REFRESH_INTERVAL),
        (-375_000_000.0, MIN_REFRESH_INTERVAL),  # ... even when already past (moto: 2015)
    ],
)
def test_refresh_delay(expires_in: float, delay: float) -> None:
    assert refresh_delay(expires_in) == delay


@pytest.mark.parametrize(
    ("url", "region"),
    [
        ("https://123456789012.dkr.ecr.eu-west-1.amazonaws.com", "eu-west-1"),
        ("https://123456789012.dkr.ecr.us-gov-west-1.amazonaws.com/", "us-gov-west-1"),
        ("https://123456789012.dkr.ecr-fips.us-east-1.amazonaws.com", "us-east-1"),
        ("https://123456789012.dkr.ecr.cn-north-1.amazonaws.com.cn", "cn-north-1"),
        ("https://123456789012.DKR.ECR.eu-west-1.amazonaws.com:443", "eu-west-1"),
        ("http://127.0.0.1:5000", None),  # a stand-in, or a typo: the region cannot be told
        ("https://public.ecr.aws", None),
        ("https://12345.dkr.ecr.eu-west-1.amazonaws.com", None),  # accounts have 12 digits
        ("https://123456789012.dkr.ecr.eu-west-1.amazonaws.com.evil.example", None),
    ],
)
def test_ecr_host_region(url: str, region: str | None) -> None:
    assert ecr_host_region(url) == region


def test_an_aws_call_gets_as_long_as_a_registry_to_connect_and_answer() -> None:
    config = UpstreamConfig(connect_timeout=2.0, header_timeout=7.5)
    assert aws_call_timeout(config) == 9.5


def _client_error(code: str, message: str) -> ClientError:
    return ClientError(
        {"Error": {"Code": code, "Message": message}}, "GetAuthorizationToken"
    )  # fmt: skip


SECRET_MESSAGE = "User: arn:aws:sts::123456789012:assumed-role/x/AKIASECRETSECRET is not authorized"


@pytest.mark.parametrize(
    ("exc", "words"),
    [
        (NoCredentialsError(), "no AWS credentials found"),
        (CredentialRetrievalError(provider="x", error_msg="s3cret"), "credential provider failed"),
        (
            _client_error("AccessDeniedException", SECRET_MESSAGE),
            "AWS answered AccessDeniedException",
        ),
        (EndpointConnectionError(endpoint_url="http://x"), "cannot reach the ECR API"),
        (ConnectTimeoutError(endpoint_url="http://x"), "cannot reach the ECR API"),
        (ReadTimeoutError(endpoint_url="http://x"), "cannot reach the ECR API"),
        (ConnectionRefusedError(), "cannot reach the ECR API"),
        (AwsFailure("GetAuthorizationToken returned an unreadable token"), "unreadable token"),
    ],
)
def test_failures_are_described_by_kind_only(exc: BaseException, words: str) -> None:
    text = describe_failure(exc)
    assert words in text
    assert "SECRET" not in text and "s3cret" not in text and "arn:" not in text


def test_botocore_debug_lines_stay_off_at_the_mirrors_debug_level() -> None:
    """botocore logs signed headers and response bodies (ECR tokens) at DEBUG."""
    script = (
        "import logging; from mirror.log import configure_logging; configure_logging('debug');"
        "print(*(logging.getLogger(n).getEffectiveLevel() for n in"
        " ('botocore.parsers', 'aiobotocore.endpoint', 'mirror.upstream')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    ).stdout.split()
    assert out == [str(logging.INFO), str(logging.INFO), str(logging.DEBUG)]
