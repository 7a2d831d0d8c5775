"""The optional Globus backend, tested ONLY against recorded (replayed) Globus Transfer API responses.

No live Globus service is reachable from CI. The responses below have the shape the Globus Transfer
API v0.10 documents for ``GET /submission_id``, ``POST /transfer`` and ``GET /task/<id>``; the
replaying adapter checks every request the backend sends against the recording, in order. The bytes
themselves are placed at the destination by the test, as Globus would have placed them.
"""

from __future__ import annotations

import json

import pytest

# Globus is an optional backend (extra "globus"): without globus-sdk there is nothing to test.
pytest.importorskip("globus_sdk")
import requests  # noqa: E402  (globus-sdk's HTTP library)

from corrflow.config.settings import load_settings  # noqa: E402
from corrflow.formats.checksums import sha256_file  # noqa: E402
from corrflow.transfer.verified import TransferError  # noqa: E402
from corrflow.transfer.globus import globus_transfer  # noqa: E402

TASK = "8a1d4b5e-0a1b-11f0-9f8e-0affcfc1d1e5"
SOURCE = "b1f2c3d4-0000-4000-8000-000000000001"
DEST = "b1f2c3d4-0000-4000-8000-000000000002"

SUBMISSION = (200, {"DATA_TYPE": "submission_id", "value": "2f6b0f0e-0a1b-11f0-9f8e-0affcfc1d1e5"})
ACCEPTED = (202, {"DATA_TYPE": "transfer_result", "code": "Accepted", "message": "The transfer has been accepted and a task has been created and queued for execution", "request_id": "Abc123", "resource": "/transfer", "submission_id": "2f6b0f0e-0a1b-11f0-9f8e-0affcfc1d1e5", "task_id": TASK, "task_link": {"DATA_TYPE": "link", "href": f"task/{TASK}?format=json", "rel": "related", "resource": "task", "title": "related task"}})


def _task(status, **extra):
    return (200, {"DATA_TYPE": "task", "task_id": TASK, "type": "TRANSFER", "status": status, "nice_status": extra.pop("nice_status", None), "files": 2, "files_transferred": 2 if status == "SUCCEEDED" else 0, "verify_checksum": True, "sync_level": 3, **extra})


UNAVAILABLE = (503, {"code": "ServiceUnavailable", "message": "Service is temporarily unavailable", "request_id": "Xyz789"})


class Replay(requests.adapters.HTTPAdapter):
    """Answers each request with the next recorded response, after checking method and path."""

    def __init__(self, recording):
        super().__init__()
        self.recording = list(recording)
        self.sent = []

    def send(self, request, **kwargs):
        method, path, (status, body) = self.recording.pop(0)
        assert request.method == method and request.path_url.split("?")[0].endswith(path), (request.method, request.path_url, method, path)
        self.sent.append((request.method, request.path_url, json.loads(request.body) if request.body else None))
        response = requests.Response()
        response.status_code = status
        response._content = json.dumps(body).encode()
        response.headers["Content-Type"] = "application/json"
        response.url = request.url
        response.request = request
        return response


@pytest.fixture
def settings(tmp_path):
    return load_settings(
        data_root=tmp_path,
        transfer={"backend": "globus", "retries": 2, "retry_delay_s": 0.0, "globus": {"source_collection": SOURCE, "destination_collection": DEST, "source_root": "/beamline", "destination_root": "/compute", "poll_interval_s": 0.01}},
    )


def _client(replay):
    import globus_sdk
    from globus_sdk.transport import RetryConfig

    # The SDK's own retries are off: the backend's retry policy is what is under test.
    client = globus_sdk.TransferClient(authorizer=globus_sdk.AccessTokenAuthorizer("recorded-token"), retry_config=RetryConfig(max_retries=0))
    client.transport.session.mount("https://", replay)
    return client


def _land(settings, run_uid):
    """What Globus would have written at the destination."""
    root = settings.compute_storage / run_uid
    for name, data in (("scan1/proj.h5", b"p" * 5000), ("scan1/tomo.nxs", b"n" * 10)):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def test_globus_task_with_checksum_verification_then_local_hashes_and_manifest(settings):
    replay = Replay([("GET", "/submission_id", SUBMISSION), ("POST", "/transfer", ACCEPTED), ("GET", f"/task/{TASK}", _task("ACTIVE")), ("GET", f"/task/{TASK}", UNAVAILABLE), ("GET", f"/task/{TASK}", _task("SUCCEEDED"))])
    root = _land(settings, "uid-1")
    manifest = globus_transfer(settings, ["scan1/proj.h5", "scan1/tomo.nxs"], destination_root=root, client=_client(replay), sleep=lambda s: None)
    assert not replay.recording  # every recorded exchange happened, the 503 was retried
    submitted = replay.sent[1][2]
    assert submitted["verify_checksum"] is True and submitted["sync_level"] == 3  # 3 = checksum
    assert submitted["submission_id"] == SUBMISSION[1]["value"]
    assert [(i["source_path"], i["destination_path"]) for i in submitted["DATA"]] == [
        ("/beamline/scan1/proj.h5", "/compute/uid-1/scan1/proj.h5"),
        ("/beamline/scan1/tomo.nxs", "/compute/uid-1/scan1/tomo.nxs"),
    ]
    assert [f.sha256 for f in manifest.files] == [sha256_file(root / "scan1/proj.h5"), sha256_file(root / "scan1/tomo.nxs")]
    assert json.loads((root / "manifest.json").read_text())["source_root"] == f"globus://{SOURCE}/beamline"


def test_failed_task_and_missing_files_write_no_manifest(settings):
    root = settings.compute_storage / "uid-2"
    failed = Replay([("GET", "/submission_id", SUBMISSION), ("POST", "/transfer", ACCEPTED), ("GET", f"/task/{TASK}", _task("FAILED", nice_status="PERMISSION_DENIED"))])
    with pytest.raises(TransferError, match="PERMISSION_DENIED"):
        globus_transfer(settings, ["scan1/proj.h5"], destination_root=root, client=_client(failed), sleep=lambda s: None)
    missing = Replay([("GET", "/submission_id", SUBMISSION), ("POST", "/transfer", ACCEPTED), ("GET", f"/task/{TASK}", _task("SUCCEEDED"))])
    with pytest.raises(TransferError, match="missing"):
        globus_transfer(settings, ["scan1/proj.h5"], destination_root=root, client=_client(missing), sleep=lambda s: None)
    assert not (root / "manifest.json").exists()


def test_client_errors_are_not_retried(settings):
    forbidden = (403, {"code": "PermissionDenied", "message": "No permission on the destination collection", "request_id": "Q1"})
    replay = Replay([("GET", "/submission_id", SUBMISSION), ("POST", "/transfer", forbidden)])
    import globus_sdk

    with pytest.raises(globus_sdk.GlobusAPIError):
        globus_transfer(settings, ["scan1/proj.h5"], destination_root=settings.compute_storage / "u3", client=_client(replay), sleep=lambda s: None)
    assert len(replay.sent) == 2  # one submit, no retry
