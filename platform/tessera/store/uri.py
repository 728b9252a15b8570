"""Store URIs, parsed once: decoded, normalised and checked here, before anything compares or opens them.

Every component that takes a URI from a person (the store, the server's allowed prefixes, the
API's validation) goes through `parse_uri`, and then works with the `Location` it returns, never
with the text again. That is what keeps a check and a use from disagreeing: `file:///srv/a/%2e%2e/b`
is decoded exactly once, to `/srv/b`, and that is both what a prefix check compares and what is read.

- `s3://bucket/key`: the key is S3's literal object name (no percent-decoding, as in the AWS CLI),
  with empty and `.` segments dropped and `..` refused; the bucket must be a plain bucket name, so
  a URI with `user:password@` in it is refused without being echoed.
- `file:///abs/path` (percent-decoded once) or a plain path (taken literally): made absolute and
  `..`-free. `resolved()` also follows symlinks, for checks about where a file really lives.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from tessera.errors import StoreError
from tessera.store.keys import normalize_key

# S3 and MinIO bucket names: letters, digits, '.', '-' (we also accept '_' and upper case, which
# some S3-compatible stores allow). Never ':', '@' or '/': those would be credentials or a host.
_BUCKET = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
# Pseudo-filesystems whose "files" are the machine's state (environment, memory, devices), never data.
PSEUDO_ROOTS = ("/proc", "/sys", "/dev")
# Where an artifact store (which is written to) never lives: the system's own directories.
SYSTEM_ROOTS = (*PSEUDO_ROOTS, "/etc", "/boot", "/bin", "/sbin", "/lib", "/lib64", "/usr", "/run", "/var/run")


@dataclass(frozen=True)
class Location:
    """A parsed store URI. `key` is normalised: '/'-separated, no empty, `.` or `..` segments;
    for a local location it is the absolute path without its leading '/'."""

    scheme: str  # "s3" or "file"
    bucket: str  # "" for file
    key: str

    @property
    def is_remote(self) -> bool:
        return self.scheme == "s3"

    @property
    def path(self) -> Path:
        if self.is_remote:
            raise StoreError(f"{self} is not a local path")
        return Path("/" + self.key)

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.key}" if self.is_remote else self.path.as_uri()

    def resolved(self) -> Location:
        """The same location with symlinks followed (local); refused if it is a system pseudo-file."""
        if self.is_remote:
            return self
        real = Location("file", "", normalize_key(os.path.realpath(self.path)))
        if real.under(PSEUDO_ROOTS):
            raise StoreError(f"{self.path} is a system pseudo-file ({', '.join(PSEUDO_ROOTS)}), not an artifact")
        return real

    def under(self, roots: tuple[str, ...]) -> bool:
        """Whether this local location is one of `roots` (absolute paths) or lies under one."""
        return not self.is_remote and any(self.within(Location("file", "", normalize_key(root))) for root in roots)

    def within(self, other: Location) -> bool:
        """Whether this location is `other` or lies under it, segment by segment."""
        if (self.scheme, self.bucket) != (other.scheme, other.bucket):
            return False
        mine, theirs = self.key.split("/") if self.key else [], other.key.split("/") if other.key else []
        return mine[: len(theirs)] == theirs


def parse_uri(uri: str | Path | Location) -> Location:
    """The one parser of store URIs (see the module doc). Errors never repeat a bucket's text."""
    if isinstance(uri, Location):
        return uri
    text = str(uri)
    if text.startswith("s3://"):
        bucket, _, key = text[len("s3://"):].partition("/")
        if not bucket:
            raise StoreError(f"{text!r}: an s3:// URI needs a bucket (s3://bucket/prefix)")
        if not _BUCKET.match(bucket):
            # Not echoed: a bucket "name" like user:password@host is exactly what must not be shown.
            raise StoreError(
                "an s3:// URI has an invalid bucket name: use letters, digits, '.', '-' or '_' (at most 63); "
                "credentials never go in a URI, they come from the store's Secret"
            )
        return Location("s3", bucket, normalize_key(key))
    if text.startswith("file://"):
        parts = urlsplit(text)
        if parts.netloc not in ("", "localhost"):
            raise StoreError("file:// URIs must be local (file:///absolute/path)")
        if parts.query or parts.fragment:
            raise StoreError("file:// URIs take no '?' or '#' part; percent-encode those characters in the path")
        path = unquote(parts.path)  # the one and only decoding
    elif "://" in text:
        scheme = text.split("://", 1)[0]
        raise StoreError(
            f"unsupported store URI scheme {scheme[:16]!r}; use s3://bucket/prefix, file:///path or a path"
        )
    else:
        path = os.path.expanduser(text)
    # abspath, not Path.absolute: `../data/x.csv` must become a key without '..'.
    return Location("file", "", normalize_key(Path(os.path.abspath(path)).as_posix()))


def check_uri(uri: str, *, store: bool = False) -> str:
    """The API's rule for a URI field (validated without touching any file): it must parse, must not
    name a pseudo-file, and a store (which is written to) must not be `/` or a system directory."""
    location = parse_uri(uri)
    is_root = not location.is_remote and not location.key
    if location.under(SYSTEM_ROOTS if store else PSEUDO_ROOTS) or (store and is_root):
        where = "a system directory" if store else "a system pseudo-file"
        raise StoreError(f"{location.path} is {where}; name a directory of your own or an s3:// URI")
    return uri
