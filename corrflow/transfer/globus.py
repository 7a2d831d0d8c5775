"""Optional Globus backend: a Globus transfer task between the two facilities' collections.

Globus moves the bytes (third-party transfer, ``sync_level="checksum"``, ``verify_checksum=True``:
Globus compares source and destination checksums itself). When the task succeeds, each file is
hashed again here, on the destination's storage, and only then is the manifest written: the same
"nothing listed before verified" rule as the other backends.

Tested only against recorded (replayed) Globus Transfer API responses — no live Globus service is
reachable from CI — see ``tests/test_transfer_backends_globus.py``.
"""

from __future__ import annotations

import os
import posixpath
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from corrflow.config.settings import Settings
from corrflow.formats.checksums import sha256_file
from corrflow.transfer.verified import MANIFEST_NAME, TransferError, TransferManifest, TransferredFile
from corrflow.transfer.backends import call_with_retries


def is_transient_globus(exc: BaseException) -> bool:
    """Network errors, 429 and 5xx answers can be retried; 4xx (auth, paths, quota) cannot."""
    import globus_sdk

    if isinstance(exc, globus_sdk.NetworkError):
        return True
    if isinstance(exc, globus_sdk.GlobusAPIError):
        return exc.http_status == 429 or exc.http_status >= 500
    return False


class _TransientGlobus(ConnectionError):
    """Wraps a retryable Globus error so :func:`call_with_retries` treats it as transient."""


def _retrying(function, *, settings: Settings, what: str):
    def wrapped():
        try:
            return function()
        except Exception as exc:
            if is_transient_globus(exc):
                raise _TransientGlobus(f"{type(exc).__name__}: {exc}") from exc
            raise

    return call_with_retries(wrapped, retries=settings.transfer.retries, delay_s=settings.transfer.retry_delay_s, what=what)


def transfer_client(settings: Settings, **client_kwargs: Any) -> Any:
    """A TransferClient authenticated as the facility's confidential client (client credentials)."""
    import globus_sdk

    globus = settings.transfer.globus
    if not (globus.client_id and globus.client_secret_file):
        raise TransferError("transfer.globus.client_id and client_secret_file are required for the globus backend")
    auth = globus_sdk.ConfidentialAppAuthClient(globus.client_id, Path(globus.client_secret_file).read_text().strip())
    authorizer = globus_sdk.ClientCredentialsAuthorizer(auth, globus_sdk.TransferClient.scopes.all)
    return globus_sdk.TransferClient(authorizer=authorizer, **client_kwargs)


def globus_transfer(
    settings: Settings,
    relative_paths: Sequence[str],
    *,
    destination_root: Path,
    client: Any | None = None,
    sleep=time.sleep,
) -> TransferManifest:
    """Transfer ``relative_paths`` (under the beamline storage) to ``destination_root`` with Globus.

    ``destination_root`` must lie under ``settings.compute_storage``; it maps to
    ``transfer.globus.destination_root`` on the destination collection.
    """
    import globus_sdk

    globus = settings.transfer.globus
    if not (globus.source_collection and globus.destination_collection):
        raise TransferError("transfer.globus.source_collection and destination_collection must be set")
    if not relative_paths:
        raise TransferError("nothing to transfer: the list of source files is empty")
    destination_root = Path(destination_root)
    try:
        below = destination_root.relative_to(settings.compute_storage).as_posix()
    except ValueError:
        raise TransferError(f"{destination_root} is not under the compute storage {settings.compute_storage}") from None
    client = client if client is not None else transfer_client(settings)
    start = time.perf_counter()
    data = globus_sdk.TransferData(
        globus.source_collection,
        globus.destination_collection,
        label=f"corrflow {below}"[:128],
        sync_level="checksum",
        verify_checksum=True,
        fail_on_quota_errors=True,
    )
    for relative in relative_paths:
        data.add_item(
            posixpath.join(globus.source_root, relative),
            posixpath.join(globus.destination_root, below, relative) if below != "." else posixpath.join(globus.destination_root, relative),
        )
    # A submission id makes the submit idempotent: a retried submit after a timeout is one task.
    data["submission_id"] = _retrying(lambda: client.get_submission_id()["value"], settings=settings, what="globus submission id")
    task_id = _retrying(lambda: client.submit_transfer(data)["task_id"], settings=settings, what="globus submit")
    deadline = time.monotonic() + globus.timeout_s
    while True:
        task = _retrying(lambda: client.get_task(task_id), settings=settings, what=f"globus task {task_id}")
        status = task["status"]
        if status == "SUCCEEDED":
            break
        if status == "FAILED":
            raise TransferError(f"Globus task {task_id} failed: {task.get('nice_status') or task.get('fatal_error')}")
        if time.monotonic() > deadline:
            raise TransferError(f"Globus task {task_id} still {status} after {globus.timeout_s:.0f} s")
        sleep(globus.poll_interval_s)
    files = []
    for relative in relative_paths:
        path = destination_root / relative
        if not path.is_file():
            raise TransferError(f"Globus task {task_id} succeeded but {path} is missing")
        files.append(TransferredFile(relative, path.stat().st_size, sha256_file(path)))
    manifest = TransferManifest(f"globus://{globus.source_collection}{globus.source_root}", str(destination_root), tuple(files), time.perf_counter() - start)
    manifest_path = destination_root / MANIFEST_NAME
    tmp = manifest_path.with_name(manifest_path.name + ".part")
    tmp.write_text(manifest.to_json())
    os.replace(tmp, manifest_path)
    return manifest
