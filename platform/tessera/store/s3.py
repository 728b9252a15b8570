"""S3 and MinIO through the `minio` SDK, configured the way KServe's storage initializer is.

One Secret serves both: `S3_ENDPOINT` (host:port or URL), `S3_USE_HTTPS` ("0"/"1"),
`S3_VERIFY_SSL`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_DEFAULT_REGION`.

Every request goes through `_call`, which retries transient failures within the `RetryPolicy`
budget (minio's own urllib3 retry loop is switched off so the bound holds) and turns what is
left into `StoreError`s that name the endpoint and object, never a credential.
"""

from __future__ import annotations

import hashlib
import io
import os
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

import certifi
import urllib3
from minio import Minio
from minio.error import InvalidResponseError, S3Error, ServerError
from pydantic import BaseModel, ConfigDict, SecretStr

from tessera.errors import ObjectNotFoundError, StoreError, StoreUnavailableError
from tessera.store.base import ObjectInfo, Progress, Store, write_atomically
from tessera.store.keys import (
    CHUNK_SIZE,
    COMPLETE_MARKER,
    INCOMPLETE_MARKER,
    AlreadyPublishedError,
    complete_marker,
    dir_prefix,
    join_key,
    local_files,
    normalize_key,
    parse_complete_marker,
)
from tessera.store.retry import RetriesExhausted, RetryPolicy, call_with_retry

T = TypeVar("T")
MiB = 1024 * 1024
DEFAULT_ENDPOINT = "s3.amazonaws.com"
# S3 error codes that mean "try again", whatever the HTTP status says.
TRANSIENT_CODES = frozenset({
    "InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout", "RequestTimeTooSkewed",
    "XMinioServerNotInitialized", "XMinioStorageFull",
})
NOT_FOUND_CODES = frozenset({"NoSuchKey", "NoSuchBucket", "NoSuchUpload", "ResourceNotFound"})
DENIED_CODES = frozenset({"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken"})


def _flag(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise StoreError(f"{name}={raw!r}: expected 0 or 1")


class S3Config(BaseModel):
    """Where the S3 endpoint is and how to sign requests. `repr` never shows the keys."""

    model_config = ConfigDict(frozen=True)

    endpoint: str = DEFAULT_ENDPOINT  # host[:port], no scheme
    secure: bool = True
    verify_ssl: bool = True
    region: str | None = None
    access_key: SecretStr | None = None
    secret_key: SecretStr | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> S3Config:
        raw = env.get("S3_ENDPOINT") or env.get("AWS_ENDPOINT_URL") or DEFAULT_ENDPOINT
        secure = _flag(env, "S3_USE_HTTPS", True)
        if "@" in raw:
            # Not echoed: the part before '@' is a user name and password.
            raise StoreError("S3_ENDPOINT must not hold credentials (user:password@): put them in "
                             "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")
        if "://" in raw:
            parts = urlsplit(raw)
            if parts.scheme not in ("http", "https") or not parts.netloc or parts.path not in ("", "/"):
                raise StoreError(f"S3_ENDPOINT={raw!r}: expected host:port or http(s)://host:port")
            endpoint, secure = parts.netloc, parts.scheme == "https"
        else:
            endpoint = raw.rstrip("/")
        access_key, secret_key = env.get("AWS_ACCESS_KEY_ID"), env.get("AWS_SECRET_ACCESS_KEY")
        if bool(access_key) != bool(secret_key):
            raise StoreError("set both AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or neither (anonymous)")
        return cls(
            endpoint=endpoint,
            secure=secure,
            verify_ssl=_flag(env, "S3_VERIFY_SSL", True),
            region=env.get("AWS_DEFAULT_REGION") or env.get("AWS_REGION") or None,
            access_key=SecretStr(access_key) if access_key else None,
            secret_key=SecretStr(secret_key) if secret_key else None,
        )

    @property
    def endpoint_url(self) -> str:
        return f"{'https' if self.secure else 'http'}://{self.endpoint}"

    def redact(self, text: str) -> str:
        """`text` with the key values replaced, for messages built from library errors."""
        for secret in (self.secret_key, self.access_key):
            if secret and secret.get_secret_value():
                text = text.replace(secret.get_secret_value(), "***")
        return text


def is_transient(error: BaseException) -> bool:
    """Connection refused or reset, timeouts, 5xx and 429: worth another try."""
    if isinstance(error, urllib3.exceptions.SSLError):
        return False  # a certificate does not fix itself
    if isinstance(error, (
        urllib3.exceptions.ProtocolError,  # connection reset or dropped mid-response
        urllib3.exceptions.TimeoutError,  # connect and read timeouts, connection refused
        urllib3.exceptions.MaxRetryError,
        ConnectionError,
        TimeoutError,
    )):
        return True
    if isinstance(error, ServerError):
        return error.status_code >= 500 or error.status_code == 429
    if isinstance(error, InvalidResponseError):
        status = getattr(error, "_code", 0) or 0
        return status >= 500 or status == 429
    if isinstance(error, S3Error):
        status = error.response.status if error.response is not None else 0
        return error.code in TRANSIENT_CODES or status >= 500 or status == 429
    return False


class _HashingReader:
    """The file-like minio reads part by part: hashes and reports what it reads, holds nothing."""

    def __init__(self, stream: io.BufferedReader, progress: Progress | None) -> None:
        self._stream = stream
        self._progress = progress
        self.digest = hashlib.sha256()
        self.read_bytes = 0

    def read(self, size: int = -1) -> bytes:
        data = self._stream.read(size)
        self.digest.update(data)
        self.read_bytes += len(data)
        if self._progress and data:
            self._progress.update(len(data))
        return data


class S3Store(Store):
    """One bucket of an S3 endpoint. Large files go up in `part_size` parts, a few in parallel,
    so memory stays near `part_size × (parallel_uploads + 1)` whatever the file size."""

    def __init__(
        self,
        bucket: str,
        config: S3Config | None = None,
        retry: RetryPolicy | None = None,
        *,
        part_size: int = 16 * MiB,
        parallel_uploads: int = 2,
    ) -> None:
        self.bucket = bucket
        self.config = config or S3Config.from_env()
        self.retry = retry or RetryPolicy.from_env()
        self.part_size = part_size
        self.parallel_uploads = parallel_uploads
        # retries=False: urllib3 raises the first failure and `_call` owns the retry budget.
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(
                connect=min(self.retry.connect_timeout, max(self.retry.total_seconds, 0.5)),
                read=self.retry.read_timeout,
            ),
            retries=False,
            maxsize=max(10, parallel_uploads + 2),
            cert_reqs="CERT_REQUIRED" if self.config.verify_ssl else "CERT_NONE",
            ca_certs=os.environ.get("SSL_CERT_FILE") or certifi.where(),
        )
        try:
            self._client = Minio(
                self.config.endpoint,
                access_key=self.config.access_key.get_secret_value() if self.config.access_key else None,
                secret_key=self.config.secret_key.get_secret_value() if self.config.secret_key else None,
                secure=self.config.secure,
                region=self.config.region,
                http_client=http,
                cert_check=self.config.verify_ssl,
            )
        except ValueError as error:
            raise StoreError(f"invalid S3 endpoint {self.config.endpoint!r}: {error}") from None
        self._bucket_ready = False
        self._bucket_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"S3Store({self.bucket!r}, endpoint={self.config.endpoint_url!r})"

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{normalize_key(key)}"

    # ---- the one way a request is made ----

    def _call(self, action: str, key: str, operation: Callable[[], T]) -> T:
        where = f"{action} {self.uri(key)} at {self.config.endpoint_url}"
        try:
            return call_with_retry(operation, self.retry, is_transient)
        except RetriesExhausted as gave_up:
            reason = self.config.redact(_short(gave_up.last_error))
            raise StoreUnavailableError(
                f"store unavailable: {where} failed after {gave_up.attempts} attempts in "
                f"{gave_up.elapsed:.1f}s ({reason}); check that the endpoint is up and reachable"
            ) from None
        except S3Error as error:
            if error.code in NOT_FOUND_CODES:
                missing = f"bucket {self.bucket!r}" if error.code == "NoSuchBucket" else self.uri(key)
                raise ObjectNotFoundError(f"{missing} does not exist (at {self.config.endpoint_url})") from None
            if error.code in DENIED_CODES:
                raise StoreError(
                    f"access denied: {where} ({error.code}); check AWS_ACCESS_KEY_ID and "
                    "AWS_SECRET_ACCESS_KEY in the store's credentials Secret"
                ) from None
            raise StoreError(f"{where} failed: {error.code}: {self.config.redact(error.message or '')}") from None
        except urllib3.exceptions.SSLError as error:
            raise StoreError(
                f"TLS failed: {where} ({self.config.redact(_short(error))}); for a plain-HTTP endpoint set "
                "S3_USE_HTTPS=0, for a self-signed certificate SSL_CERT_FILE or S3_VERIFY_SSL=0"
            ) from None
        except (InvalidResponseError, ServerError) as error:
            raise StoreError(f"{where} failed: {self.config.redact(_short(error))}") from None
        except ValueError as error:  # minio's own checks of bucket and object names
            raise StoreError(f"{where}: {error}") from None

    def _ensure_bucket(self) -> None:
        """Writes create the bucket on first use; reads never do."""
        with self._bucket_lock:
            if self._bucket_ready:
                return
            if not self._call("check bucket", "", lambda: self._client.bucket_exists(self.bucket)):
                self._call("create bucket", "", self._make_bucket)
            self._bucket_ready = True

    def _make_bucket(self) -> None:
        try:
            self._client.make_bucket(self.bucket)
        except S3Error as error:
            if error.code != "BucketAlreadyOwnedByYou":  # another writer of ours was first
                raise

    # ---- primitives ----

    def _put_file(self, path: Path, key: str, progress: Progress | None) -> str:
        self._ensure_bucket()
        size = path.stat().st_size

        def upload() -> str:
            with path.open("rb") as stream:
                reader = _HashingReader(stream, progress)
                try:
                    self._client.put_object(
                        self.bucket, key, reader, size,
                        part_size=self.part_size, num_parallel_uploads=self.parallel_uploads,
                    )
                except BaseException:
                    if progress and reader.read_bytes:
                        progress.update(-reader.read_bytes)
                    raise
                return reader.digest.hexdigest()

        return self._call("upload", key, upload)

    def _get_file(self, key: str, path: Path, progress: Progress | None) -> str:
        return self._call("download", key, lambda: write_atomically(self._stream(key), path, progress))

    def _put_bytes(self, key: str, data: bytes) -> None:
        self._ensure_bucket()
        self._call("write", key, lambda: self._client.put_object(self.bucket, key, io.BytesIO(data), len(data)))

    def _get_bytes(self, key: str) -> bytes:
        return self._call("read", key, lambda: b"".join(self._stream(key)))

    def _sha256(self, key: str) -> str:
        def digest() -> str:
            hasher = hashlib.sha256()
            for chunk in self._stream(key):
                hasher.update(chunk)
            return hasher.hexdigest()

        return self._call("hash", key, digest)

    def _stream(self, key: str) -> Iterator[bytes]:
        response = self._client.get_object(self.bucket, key)
        try:
            yield from response.stream(CHUNK_SIZE)
        finally:
            response.close()
            response.release_conn()

    def _walk(self, prefix: str) -> list[ObjectInfo]:
        def listing() -> list[ObjectInfo]:
            objects = self._client.list_objects(self.bucket, prefix=prefix or None, recursive=True)
            return [ObjectInfo(o.object_name, o.size or 0) for o in objects if not o.is_dir]

        return self._call("list", prefix, listing)

    def _stat(self, key: str) -> int | None:
        try:
            return self._call("stat", key, lambda: self._client.stat_object(self.bucket, key)).size
        except ObjectNotFoundError:
            return None

    def _delete_keys(self, keys: list[str]) -> None:
        if not keys:
            return
        from minio.deleteobjects import DeleteObject

        def delete() -> None:
            errors = list(self._client.remove_objects(self.bucket, [DeleteObject(k) for k in keys]))
            if errors:
                first = errors[0]
                raise StoreError(f"could not delete {len(errors)} objects, first {first.name}: {first.code}")

        self._call("delete", keys[0], delete)

    def _create_exclusive(self, key: str, data: bytes) -> bool:
        """PUT with `If-None-Match: *`: False when the object already exists (S3 and MinIO honour it).

        minio-py's public `put_object` turns unknown headers into user metadata, so the
        conditional write goes through its PutObject primitive.
        """
        headers = {"If-None-Match": "*", "Content-Type": "application/json"}

        def put() -> bool:
            try:
                self._client._put_object(self.bucket, key, data, headers)
            except S3Error as error:
                if error.code == "PreconditionFailed":
                    return False
                raise
            return True

        return self._call("write", key, put)

    # ---- atomic publish ----

    def publish_dir(self, local_dir: str | Path, prefix: str, *, progress: Progress | None = None) -> dict[str, str]:
        """`_INCOMPLETE` first, every file, then `_COMPLETE` (conditional: one publish wins), and
        `_INCOMPLETE` removed. Readers treat the prefix as absent until `_COMPLETE` is there.
        A prefix left incomplete by an interrupted publish is cleared and published again.
        """
        files = local_files(Path(local_dir))
        key = normalize_key(prefix)
        if not key:
            raise StoreError("cannot publish to the root of a bucket: name a directory")
        base = dir_prefix(key)
        self._ensure_bucket()
        existing = [info.key for info in self._walk(base)]
        if base + COMPLETE_MARKER in existing:
            raise AlreadyPublishedError(f"{self.uri(key)} is already published; publish a new version instead")
        if existing and base + INCOMPLETE_MARKER not in existing:
            raise StoreError(f"{self.uri(key)} already exists and is not a publish: delete it or pick another name")
        publish_id = uuid.uuid4().hex
        self._put_bytes(base + INCOMPLETE_MARKER, f'{{"publishId": "{publish_id}"}}'.encode())
        # What an interrupted publish left: its files, and multipart uploads a SIGKILL never aborted.
        self._delete_keys([k for k in existing if k != base + INCOMPLETE_MARKER])
        self._abort_uploads(base)
        if progress:
            progress.begin(sum(path.stat().st_size for path in files.values()))
        try:
            manifest = {rel: self._put_file(path, join_key(key, rel), progress) for rel, path in files.items()}
        except BaseException:
            self._clear_failed_publish(base)
            raise
        marker = complete_marker(manifest, publish_id, datetime.now(timezone.utc).isoformat())
        if not self._create_exclusive(base + COMPLETE_MARKER, marker):
            winner = parse_complete_marker(self._get_bytes(base + COMPLETE_MARKER), self.uri(base + COMPLETE_MARKER))
            # A retried PUT whose first try landed finds its own marker: that is success.
            if winner.get("publishId") != publish_id:
                raise AlreadyPublishedError(f"{self.uri(key)} was published by someone else meanwhile")
        self._delete_keys([base + INCOMPLETE_MARKER])
        return manifest

    def _clear_failed_publish(self, base: str) -> None:
        """Best effort after a failed upload: abort its multipart uploads and delete its files, the
        `_INCOMPLETE` marker last (until then readers treat the prefix as absent). If the store is
        down this fails too, and the next publish to the prefix clears it."""
        try:
            self._abort_uploads(base)
            self._delete_keys([info.key for info in self._walk(base) if info.key != base + INCOMPLETE_MARKER])
            self._delete_keys([base + INCOMPLETE_MARKER])
        except StoreError:
            pass

    def _abort_uploads(self, prefix: str) -> int:
        """Abort every multipart upload in progress under `prefix`: unfinished parts are stored (and
        billed) but never listed. minio-py aborts its own on an exception; a killed process cannot."""

        def abort() -> int:
            aborted, key_marker, upload_marker = 0, None, None
            while True:
                result = self._client._list_multipart_uploads(
                    self.bucket, prefix=prefix, key_marker=key_marker, upload_id_marker=upload_marker)
                for upload in result.uploads:
                    try:
                        self._client._abort_multipart_upload(self.bucket, upload.object_name, upload.upload_id)
                        aborted += 1
                    except S3Error as error:
                        if error.code != "NoSuchUpload":  # finished or aborted meanwhile
                            raise
                if not result.is_truncated or not result.next_key_marker:
                    return aborted
                key_marker, upload_marker = result.next_key_marker, result.next_upload_id_marker

        return self._call("abort uploads under", prefix, abort)


def _short(error: BaseException) -> str:
    text = str(error) or type(error).__name__
    text = " ".join(text.split())
    return f"{type(error).__name__}: {text[:300]}"

