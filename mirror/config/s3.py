"""The [s3] section: value parsers within S3's own limits, and the checks across its keys."""

from __future__ import annotations

import ipaddress
import re
from typing import Any

from mirror.config.model import MiB, S3Config
from mirror.config.registries import aws_endpoint_url, aws_region
from mirror.config.values import optional_str, parse_duration, parse_size

GiB = 1024 * MiB
# S3's limits: a single PUT holds at most 5 GiB; a multipart part is 5 MiB..5 GiB (the last
# may be smaller); a presigned (SigV4) URL lives at most 7 days; a key is at most 1024 bytes.
MAX_PUT = 5 * GiB
MIN_PART, MAX_PART = 5 * MiB, 5 * GiB
MAX_PRESIGN = 7 * 86400.0
_KEY_TAIL = len("blobs/sha256/") + 64
MAX_PREFIX = 1024 - _KEY_TAIL

# Bucket names as S3 allows them for new buckets: 3-63 lowercase letters, digits, dots and
# hyphens, a letter or digit at each end.
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
# S3's "safe" key characters: nothing a URL or a presigned signature would need to escape.
_PREFIX = re.compile(r"[A-Za-z0-9!_.*'()/-]*")


def s3_bucket(value: Any) -> str | None:
    name = optional_str(value)
    if name is None:
        return None
    if name.startswith("s3://") or "/" in name:
        raise ValueError(f"expected a bucket name, not a URL or path, got {name!r}")
    if not _BUCKET.fullmatch(name) or ".." in name or _is_ipv4(name):
        raise ValueError(
            f"expected an S3 bucket name (3-63 of a-z, 0-9, '.', '-'; a letter or digit at "
            f"each end), got {name!r}"
        )
    return name


def _is_ipv4(name: str) -> bool:
    try:
        return ipaddress.ip_address(name).version == 4
    except ValueError:
        return False


def s3_region(value: Any) -> str | None:
    return None if optional_str(value) is None else aws_region(value)


def s3_endpoint_url(value: Any) -> str | None:
    if optional_str(value) is None:
        return None
    return aws_endpoint_url(value, "uploads, and redirects that hand out presigned URLs")


def s3_prefix(value: Any) -> str:
    """Empty or "path/": keys are <prefix>blobs/sha256/<hex>."""
    if not isinstance(value, str):
        raise ValueError(f"expected a key prefix like 'mirror/', got {value!r}")
    if value and not value.endswith("/"):
        raise ValueError(f"must be empty or end in '/', got {value!r}")
    if value.startswith("/") or "//" in value:
        raise ValueError(f"must not start with '/' or hold an empty segment, got {value!r}")
    if not _PREFIX.fullmatch(value):
        raise ValueError(f"only a-z A-Z 0-9 ! _ . * ' ( ) / - are allowed, got {value!r}")
    # An HTTP client normalises "./" and "../" in a URL path, breaking a presigned signature.
    if {".", ".."} & set(value.split("/")):
        raise ValueError(f"must not hold '.' or '..' segments, got {value!r}")
    if len(value) > MAX_PREFIX:
        raise ValueError(f"at most {MAX_PREFIX} characters (S3 keys are at most 1024 bytes)")
    return value


def redirect_expiry(value: Any) -> float:
    seconds = parse_duration(value)
    if not 1.0 <= seconds <= MAX_PRESIGN:
        raise ValueError("must be from 1s to 7d (the longest a presigned URL can live)")
    return seconds


def multipart_threshold(value: Any) -> int:
    size = parse_size(value)
    if size > MAX_PUT:
        raise ValueError("must be at most 5GiB (S3's largest single PUT)")
    return size


def part_size(value: Any) -> int:
    size = parse_size(value)
    if not MIN_PART <= size <= MAX_PART:
        raise ValueError("must be from 5MiB to 5GiB (S3's multipart part limits)")
    return size


def s3_problems(s3: S3Config) -> list[str]:
    """What is wrong across keys: a level without a region, or settings with no bucket."""
    problems = []
    if s3.enabled and s3.region is None:
        problems.append("s3.region: required when s3.bucket is set")
    if s3.redirect and not s3.enabled:
        problems.append("s3.redirect: needs s3.bucket (there is nothing to redirect to)")
    if s3.endpoint_url is not None and not s3.enabled:
        problems.append("s3.endpoint_url: needs s3.bucket")
    return problems
