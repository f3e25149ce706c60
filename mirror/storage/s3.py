"""The region's bucket as a store: blobs and manifests by digest, shared by every replica.

Keys are `<prefix>blobs/sha256/<hex>`; a manifest's media type is its object's Content-Type.
Writes are conditional (`If-None-Match: *`): when two replicas write one key, the second gets
412 and drops its copy, so a key is written once. A single PUT carries the blob's own sha256
as its checksum, so S3 refuses bytes that do not match the key; a multipart upload carries
one per part. One attempt per call: whoever calls owns retries (and the breaker).

Imported only when an S3 level is configured (aiobotocore is slow to import).
"""

from __future__ import annotations

import base64
import hashlib
import io
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from mirror.aws import CREDENTIAL_FAILURES, LazyClient
from mirror.oci.digest import Digest
from mirror.storage.blobstore import AlreadyStored, StoreError, StoreUnavailable

READ_CHUNK = 256 * 1024
BLOB_TYPE = "application/octet-stream"
_MISSING = frozenset({"404", "NoSuchKey", "NotFound"})
_LOST_RACE = frozenset({"412", "PreconditionFailed"})


@dataclass(frozen=True, slots=True)
class S3Settings:
    bucket: str
    prefix: str
    multipart_threshold: int
    part_size: int

    def key(self, digest: Digest) -> str:
        return f"{self.prefix}blobs/{digest.algorithm}/{digest.hex}"


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def _code(exc: ClientError) -> str:
    error = exc.response.get("Error", {})
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return str(error.get("Code") or status or "")


class S3Store:
    """A BlobStore (and ManifestStore, by digest) in one bucket under one prefix."""

    def __init__(
        self,
        client: LazyClient,
        settings: S3Settings,
        observe: Callable[[str, str], None] = lambda operation, result: None,
    ) -> None:
        self._client = client
        self.settings = settings
        self._observe = observe  # (operation, ok | missing | lost_race | error): for metrics

    async def call(self, operation: str, **params: Any) -> Any:
        """One S3 call; ClientError and the rest become StoreErrors the caller can act on."""
        client = await self._client.get()
        try:
            reply = await getattr(client, operation)(Bucket=self.settings.bucket, **params)
        except ClientError as exc:
            code = _code(exc)
            result = "missing" if code in _MISSING else "lost_race" if code in _LOST_RACE else ""
            self._observe(operation, result or "error")
            if result == "missing":
                raise KeyError(params.get("Key")) from exc
            if result == "lost_race":
                raise AlreadyStored(f"{params.get('Key')} was written by another replica") from exc
            raise StoreUnavailable(f"S3 answered {code} to {operation}") from exc
        except CREDENTIAL_FAILURES as exc:
            self._observe(operation, "error")
            await self._client.refused(client)
            raise StoreUnavailable(f"no AWS credentials for S3 ({type(exc).__name__})") from exc
        except (BotoCoreError, OSError) as exc:  # unreachable, timed out
            self._observe(operation, "error")
            raise StoreUnavailable(f"S3 {operation} failed: {type(exc).__name__}") from exc
        self._observe(operation, "ok")
        return reply

    # -- BlobStore ---------------------------------------------------------------------------

    async def stat(self, digest: Digest) -> int | None:
        try:
            reply = await self.call("head_object", Key=self.settings.key(digest))
        except KeyError:
            return None
        return int(reply["ContentLength"])

    async def open(self, digest: Digest) -> S3Blob | None:
        size = await self.stat(digest)
        return None if size is None else S3Blob(self, self.settings.key(digest), size)

    async def create(self, *, size: int | None = None, digest: Digest | None = None) -> S3Writer:
        return S3Writer(self, size, digest)

    async def remove(self, digest: Digest) -> int | None:
        size = await self.stat(digest)
        if size is None:
            return None
        await self.call("delete_object", Key=self.settings.key(digest))
        return size

    async def presign(self, digest: Digest, expires: float) -> str:
        """A GET URL for the blob that needs no credentials until it expires."""
        client = await self._client.get()
        url: str = await client.generate_presigned_url(
            "get_object",
            Params={"Bucket": self.settings.bucket, "Key": self.settings.key(digest)},
            ExpiresIn=int(expires),
        )
        return url

    # -- manifests, by digest ----------------------------------------------------------------

    async def read_manifest(self, digest: Digest) -> tuple[bytes, str] | None:
        try:
            reply = await self.call("get_object", Key=self.settings.key(digest))
        except KeyError:
            return None
        body = await _read_all(reply["Body"], 4 * 1024 * 1024 + 1)
        return body, str(reply.get("ContentType") or BLOB_TYPE)

    async def write_manifest(self, digest: Digest, body: bytes, media_type: str) -> None:
        try:
            await self.call(
                "put_object", Key=self.settings.key(digest), Body=body, ContentType=media_type,
                ChecksumSHA256=_b64(bytes.fromhex(digest.hex)), IfNoneMatch="*",
            )  # fmt: skip
        except AlreadyStored:
            pass  # written by another replica: the same bytes, by their digest


class S3Blob:
    def __init__(self, store: S3Store, key: str, size: int) -> None:
        self._store = store
        self._key = key
        self._size = size

    @property
    def size(self) -> int:
        return self._size

    async def read(self, start: int, end: int) -> AsyncGenerator[bytes, None]:
        """Bytes [start, end) from one ranged GET; StoreUnavailable if it breaks off."""
        if end <= start:
            return
        try:
            reply = await self._store.call(
                "get_object", Key=self._key, Range=f"bytes={start}-{end - 1}"
            )
        except KeyError as exc:  # removed since it was opened
            raise StoreUnavailable(f"{self._key} is gone") from exc
        body = reply["Body"]
        got = 0
        try:
            while got < end - start:
                try:
                    chunk = await body.read(READ_CHUNK)
                except Exception as exc:  # noqa: BLE001 - aiohttp's payload errors come through raw
                    raise StoreUnavailable(f"S3 body broke off: {type(exc).__name__}") from exc
                if not chunk:
                    raise StoreUnavailable(f"S3 body ended at byte {start + got} of {end}")
                got += len(chunk)
                yield chunk
        finally:
            body.close()

    def close(self) -> None:
        pass


class S3Writer:
    """Buffered while small (one PUT with the blob's sha256 at commit); past the multipart
    threshold, parts go out as each one is whole, each with its own checksum.

    Each byte is held once: a write that is a whole part (the whole blob, for a single PUT
    of known size) is kept as it is, other writes fill a buffer sized to their part, and
    every body goes to botocore as a stream (`_Body`). Uploads share memory with serving."""

    def __init__(self, store: S3Store, size: int | None, digest: Digest | None) -> None:
        self._store = store
        self._settings = store.settings
        self._expected = size
        self._multipart = size is not None and size > self._settings.multipart_threshold
        # One part spans this much; a single PUT of known size is one part (an empty one too).
        whole = size is not None and not self._multipart
        self._span = max(size or 0, 1) if whole else self._settings.part_size
        self._parts: dict[int, bytes | bytearray] = {}  # part index -> bytes, not yet sent
        self._filled: dict[int, int] = {}  # part index -> bytes written into it
        self._sent: dict[int, dict[str, Any]] = {}  # part number -> what complete needs
        self._upload_id: str | None = None
        # Known from the start (a digest given to create): parts go out as they fill.
        self._key = None if digest is None else self._settings.key(digest)
        self._size = 0
        self._done = False

    @property
    def committed(self) -> bool:
        return self._done

    def _length(self, index: int) -> int:
        """What part `index` holds when whole (its span, less for the last of a known size)."""
        if self._expected is None:
            return self._span
        return max(0, min(self._span, self._expected - index * self._span))

    async def write(self, offset: int, data: bytes) -> None:
        if self._expected is not None and offset + len(data) > self._expected:
            raise StoreError("written past the size the writer was created for")
        self._size = max(self._size, offset + len(data))
        index, within = divmod(offset, self._span)
        if within == 0 and len(data) == self._length(index) and index not in self._parts:
            self._parts[index] = data  # a whole part: kept, not copied
            self._filled[index] = len(data)
        else:
            self._copy(offset, data)
        if not self._multipart and sum(self._filled.values()) > self._settings.multipart_threshold:
            self._multipart = True  # size unknown at create: parts of part_size from now on
        if self._multipart:
            for index in [
                i for i, n in self._filled.items() if n >= self._span and i in self._parts
            ]:
                await self._send_part(index, self._parts.pop(index))

    def _copy(self, offset: int, data: bytes) -> None:
        """`data` into the buffers of the parts it falls in (a part kept whole is copied
        into a buffer first, should a write overlap it)."""
        view = memoryview(data)
        while view:
            index, within = divmod(offset, self._span)
            part = self._parts.get(index)
            if not isinstance(part, bytearray):
                fresh = bytearray(self._length(index))
                if part is not None:
                    fresh[: len(part)] = part
                self._parts[index] = part = fresh
            take = min(len(view), self._span - within)
            part[within : within + take] = view[:take]
            self._filled[index] = self._filled.get(index, 0) + take
            offset += take
            view = view[take:]

    async def commit(self, digest: Digest) -> None:
        key = self._settings.key(digest)
        if self._key is not None and self._key != key:
            raise StoreError("committed under another digest than it was created for")
        if not self._multipart:
            if list(self._parts) == [0] and len(self._parts[0]) == self._size:
                body = self._parts[0]
            else:
                body = b"".join(self._parts[i] for i in sorted(self._parts))[: self._size]
            await self._store.call(
                "put_object", Key=key, Body=_Body(body), ContentType=BLOB_TYPE,
                ChecksumSHA256=_b64(bytes.fromhex(digest.hex)), IfNoneMatch="*",
            )  # fmt: skip
            self._done = True
            self._parts.clear()
            return
        self._key = key
        for index in sorted(self._parts):
            end = min(self._span, self._size - index * self._span)
            part = self._parts.pop(index)
            await self._send_part(index, part if len(part) == end else part[:end])
        upload_id = await self._begin()
        try:
            await self._store.call(
                "complete_multipart_upload", Key=key, UploadId=upload_id, IfNoneMatch="*",
                MultipartUpload={"Parts": [self._sent[n] for n in sorted(self._sent)]},
            )  # fmt: skip
        except AlreadyStored:
            await self.discard()
            raise
        self._done = True

    async def discard(self) -> None:
        self._parts.clear()
        upload_id, self._upload_id = self._upload_id, None
        if upload_id is not None and not self._done and self._key is not None:
            try:
                await self._store.call("abort_multipart_upload", Key=self._key, UploadId=upload_id)
            except (StoreError, KeyError):
                pass  # the bucket's lifecycle rule aborts what is left after a day

    async def _begin(self) -> str:
        if self._upload_id is None:
            assert self._key is not None, "a multipart upload starts at commit, once keyed"
            reply = await self._store.call(
                "create_multipart_upload", Key=self._key, ContentType=BLOB_TYPE,
                ChecksumAlgorithm="SHA256",
            )  # fmt: skip
            self._upload_id = str(reply["UploadId"])
        return self._upload_id

    async def _send_part(self, index: int, data: bytes | bytearray) -> None:
        if self._key is None:
            # No digest given to create: parts wait in memory until commit names the key.
            self._parts[index] = data
            return
        upload_id = await self._begin()
        number = index + 1
        checksum = _b64(hashlib.sha256(data).digest())
        reply = await self._store.call(
            "upload_part", Key=self._key, UploadId=upload_id, PartNumber=number, Body=_Body(data),
            ChecksumSHA256=checksum,
        )  # fmt: skip
        self._sent[number] = {
            "ETag": reply["ETag"],
            "PartNumber": number,
            "ChecksumSHA256": checksum,
        }


class _Body(io.RawIOBase):
    """A request body botocore streams, a read at a time, over bytes held elsewhere.

    Given bytes or a bytearray, botocore holds one to three more copies of them while it
    sends (measured: +64 MB for 64 MiB of bytes, +188 MB for a bytearray; a BytesIO, +63);
    given a file-like object, about 1 MB. Seekable, so botocore can sign and resend it."""

    def __init__(self, data: bytes | bytearray) -> None:
        super().__init__()
        self._view = memoryview(data)
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: len(self._view)}[whence]
        self._pos = max(0, min(len(self._view), base + offset))
        return self._pos

    def readinto(self, buffer: Any) -> int:
        count = min(len(buffer), len(self._view) - self._pos)
        buffer[:count] = self._view[self._pos : self._pos + count]
        self._pos += count
        return count

    def read(self, size: int | None = -1) -> bytes:
        left = len(self._view) - self._pos
        count = left if size is None or size < 0 else min(size, left)
        out = bytes(self._view[self._pos : self._pos + count])
        self._pos += count
        return out

    def __len__(self) -> int:
        return len(self._view) - self._pos


async def _read_all(body: Any, cap: int) -> bytes:
    out = bytearray()
    try:
        while chunk := await body.read(READ_CHUNK):
            out += chunk
            if len(out) > cap:
                raise StoreUnavailable("object larger than a manifest may be")
    except StoreError:
        raise
    except Exception as exc:  # noqa: BLE001 - aiohttp's payload errors come through raw
        raise StoreUnavailable(f"S3 body broke off: {type(exc).__name__}") from exc
    finally:
        body.close()
    return bytes(out)
