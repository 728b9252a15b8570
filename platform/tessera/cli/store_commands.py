"""`tessera store ls|cp|rm`: the artifact store from the command line (s3:// URIs or local paths).

S3 endpoint and credentials come from the environment, as for every other command:
S3_ENDPOINT, S3_USE_HTTPS, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer

from tessera.scratch import scratch_dir

if TYPE_CHECKING:
    from tessera.store import Progress, Store

app = typer.Typer(no_args_is_help=True)

RECURSIVE = typer.Option(False, "-r", "--recursive", help="Whole directories (prefixes).")


@app.command("ls")
def ls_command(
    uri: str = typer.Argument(..., help="s3://bucket/prefix, file:///path or a path."),
    recursive: bool = RECURSIVE,
) -> None:
    """List a directory: names relative to URI, sub-directories ending in '/' unless -r."""
    from tessera.errors import ObjectNotFoundError
    from tessera.store import open_store
    from tessera.store.keys import dir_prefix

    store, key = open_store(uri)
    entries = store.list(key, recursive=recursive)
    if not entries and key:
        raise ObjectNotFoundError(f"{store.uri(key)}: nothing is stored there")
    for entry in entries:
        typer.echo(entry[len(dir_prefix(key)):] if entry != key else entry.rsplit("/", 1)[-1])


@app.command("cp")
def cp_command(
    source: str = typer.Argument(..., help="What to copy: s3://bucket/key, file:///path or a path."),
    destination: str = typer.Argument(..., help="Where to: a key, or a directory ending in '/'."),
    recursive: bool = RECURSIVE,
) -> None:
    """Copy a file, or with -r a directory, between the local disk and a store (either way)."""
    from tessera.errors import ObjectNotFoundError, StoreError
    from tessera.store import join_key, open_store
    from tessera.store.progress import TqdmProgress

    src_store, src_key = open_store(source)
    dst_store, dst_key = open_store(destination)
    src_local = src_store.local_path(src_key)
    is_file = src_local.is_file() if src_local is not None else src_store.stat(src_key) is not None
    if is_file:
        dst_local = dst_store.local_path(dst_key)
        if destination.endswith("/") or (dst_local is not None and dst_local.is_dir()):
            dst_key = join_key(dst_key, src_key.rsplit("/", 1)[-1])
    elif not recursive:
        if src_store.exists(src_key):
            raise StoreError(f"{src_store.uri(src_key)} is a directory: copy it with -r")
        raise ObjectNotFoundError(f"{src_store.uri(src_key)} does not exist")

    with TqdmProgress(f"cp {Path(src_key).name}") as progress:
        if src_local is not None:
            _upload(src_local, dst_store, dst_key, is_file, progress)
        elif dst_store.local_path(dst_key) is not None:
            _download(src_store, src_key, dst_store.local_path(dst_key), is_file, progress)
        else:
            with scratch_dir("cp") as scratch:
                staged = _download(src_store, src_key, Path(scratch) / "data", is_file, progress)
                _upload(staged, dst_store, dst_key, is_file, progress)
    typer.echo(f"copied {src_store.uri(src_key)} -> {dst_store.uri(dst_key)}")


def _download(store: Store, key: str, target: Path, is_file: bool, progress: Progress) -> Path:
    if is_file:
        return store.get_file(key, target, progress=progress)
    return store.get_dir(key, target, progress=progress)


def _upload(source: Path, store: Store, key: str, is_file: bool, progress: Progress) -> None:
    if is_file:
        store.put_file(source, key, progress=progress)
    else:
        store.put_dir(source, key, progress=progress)


@app.command("rm")
def rm_command(
    uri: str = typer.Argument(..., help="The object, or with -r the directory, to delete."),
    recursive: bool = RECURSIVE,
) -> None:
    """Delete an object, or with -r a directory (a published one disappears at once)."""
    from tessera.store import open_store

    store, key = open_store(uri)
    store.delete(key, recursive=recursive)
    typer.echo(f"removed {store.uri(key)}")


@app.command("tenant-key")
def tenant_key_command(
    namespace: str = typer.Option(..., "--namespace", "-n", help="The tenant namespace the key is for."),
    store_root: list[str] = typer.Option(..., "--store-root", help="s3:// store root tenants share (repeatable)."),
    shared_prefix: list[str] = typer.Option(["models"], "--shared-prefix", help="Read-only prefix (repeatable)."),
    secret_name: str = typer.Option("tessera-store", help="Name of the Secret printed."),
) -> None:
    """Give a namespace its own MinIO user, limited to its prefixes, and print its store Secret.

    The MinIO admin API is reached at S3_ENDPOINT (S3_USE_HTTPS) with MINIO_ROOT_USER and
    MINIO_ROOT_PASSWORD from the environment (never from arguments). Pipe the output to
    `kubectl apply -f -`: the new secret key is printed once, nowhere else.
    """
    import base64
    import os

    import yaml
    from minio.credentials import StaticProvider
    from minio.minioadmin import MinioAdmin

    from tessera.api.tenancy import TenancyRules
    from tessera.errors import InvalidSpecError
    from tessera.store.tenant_keys import provision_tenant

    missing = [name for name in ("S3_ENDPOINT", "MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD") if not os.environ.get(name)]
    if missing:
        raise InvalidSpecError([f"{name}: not set in the environment" for name in missing], "tessera store tenant-key")
    secure = os.environ.get("S3_USE_HTTPS", "0").lower() in ("1", "true", "yes")
    admin = MinioAdmin(endpoint=os.environ["S3_ENDPOINT"], secure=secure,
                       credentials=StaticProvider(os.environ["MINIO_ROOT_USER"], os.environ["MINIO_ROOT_PASSWORD"]))
    rules = TenancyRules(tuple(store_root), tuple(shared_prefix))
    key = provision_tenant(admin, namespace, rules.tenant_prefixes(namespace), rules.shared())
    data = {"S3_ENDPOINT": os.environ["S3_ENDPOINT"], "S3_USE_HTTPS": "1" if secure else "0",
            "AWS_ACCESS_KEY_ID": key.access_key, "AWS_SECRET_ACCESS_KEY": key.secret_key}
    typer.echo(yaml.safe_dump({"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                               "metadata": {"name": secret_name, "namespace": namespace},
                               "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}},
                              sort_keys=False), nl=False)
