"""A store key per tenant namespace: a MinIO user whose policy reaches that namespace's prefixes only.

With one key for every namespace, a key that leaks (or a pod that misbehaves) reaches every tenant's
data. `provision_tenant` makes, through MinIO's admin API (the `minio` SDK's `MinioAdmin`), a policy
`tessera-<namespace>` that allows read and write under the namespace's prefixes and read-only under
the shared ones (both as `tessera.api.tenancy` lists them), a user with a fresh secret,
and attaches one to the other. The admin puts the key in the namespace's store Secret
(`tessera store tenant-key`, docs/install.md "Multi-tenant"). The policy is standard AWS IAM JSON,
which MinIO evaluates as S3 does.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tessera.errors import StoreError
from tessera.store.uri import parse_uri

READ = ["s3:GetObject"]
WRITE = ["s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload",
         "s3:ListMultipartUploadParts"]


@dataclass(frozen=True)
class TenantKey:
    access_key: str
    secret_key: str
    policy: str


def policy_name(namespace: str) -> str:
    return f"tessera-{namespace}"


def tenant_policy(own_prefixes: Sequence[str], shared_prefixes: Sequence[str]) -> dict[str, Any]:
    """The IAM policy of a tenant's key: read-write under `own_prefixes`, read-only under
    `shared_prefixes` (s3:// URIs, as `tessera.api.tenancy.TenancyRules` lists them)."""
    own, shared = [_arn(uri) for uri in own_prefixes], [_arn(uri) for uri in shared_prefixes]
    buckets = sorted({bucket for bucket, _ in own + shared})
    listable = [key for _, key in own + shared]
    return {
        "Version": "2012-10-17",
        "Statement": [
            {"Sid": "OwnPrefixes", "Effect": "Allow", "Action": WRITE,
             "Resource": [f"arn:aws:s3:::{bucket}/{key}/*" for bucket, key in own]},
            {"Sid": "SharedReadOnly", "Effect": "Allow", "Action": READ,
             "Resource": [f"arn:aws:s3:::{bucket}/{key}/*" for bucket, key in shared]},
            {"Sid": "ListOwnAndShared", "Effect": "Allow", "Action": ["s3:ListBucket"],
             "Resource": [f"arn:aws:s3:::{bucket}" for bucket in buckets],
             "Condition": {"StringLike": {"s3:prefix": [*listable, *(f"{key}/*" for key in listable)]}}},
            {"Sid": "BucketLocation", "Effect": "Allow", "Action": ["s3:GetBucketLocation"],
             "Resource": [f"arn:aws:s3:::{bucket}" for bucket in buckets]},
        ],
    }


def _arn(uri: str) -> tuple[str, str]:
    location = parse_uri(uri)
    if not location.is_remote or not location.key:
        raise StoreError(f"{uri}: a tenant key covers prefixes of an s3:// store")
    return location.bucket, location.key


def provision_tenant(admin: Any, namespace: str, own_prefixes: Sequence[str],
                     shared_prefixes: Sequence[str]) -> TenantKey:
    """Create (or replace) `namespace`'s policy and user on MinIO through `admin` (a `MinioAdmin`).

    Returns the new key; its secret is shown nowhere else, so the caller puts it in a Secret."""
    name = policy_name(namespace)
    key = TenantKey(access_key=f"tessera-{namespace}"[:64], secret_key=secrets.token_urlsafe(30), policy=name)
    admin.policy_add(name, policy=tenant_policy(own_prefixes, shared_prefixes))
    admin.user_add(key.access_key, key.secret_key)
    admin.attach_policy([name], user=key.access_key)
    return key
