"""What a blob download and its readers share: states, outcomes, and the waiting rules."""

from __future__ import annotations

import enum
import sys

from mirror.oci.digest import Digest

READ_SIZE = 1024 * 1024  # largest piece a reader takes from the file at once
WAKE_BATCH = 256 * 1024  # wake a reader once this much is new for it ...
WAKE_INTERVAL = 0.02  # ... or this often, so slow links still trickle promptly
UNKNOWN_END = sys.maxsize


class State(enum.Enum):
    RUNNING = "running"
    COMMITTED = "committed"  # verified and in the cache
    PASSED = "passed"  # verified and served, but not cached (the disk was full)
    FAILED = "failed"


RELAY_BUFFER = 4 * 1024 * 1024  # per reader, while passing bytes through without a cache file


class DigestMismatch(Exception):
    def __init__(self, expected: Digest, actual: str) -> None:
        self.expected = expected
        self.actual = actual
        super().__init__(f"upstream bytes hash to sha256:{actual}, expected {expected}")


class DownloadFailed(Exception):
    """Raised to readers whose download failed; `cause` says why."""

    def __init__(self, cause: BaseException) -> None:
        self.cause = cause
        super().__init__(str(cause))
