"""Transfer backends against a real OpenSSH server started by the test on loopback.

The sshd (Debian package ``openssh-server``) runs with a throw-away host key and a throw-away
client key, on a random port of 127.0.0.1, and is stopped at the end of the module.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from facility_helpers import free_port

from corrflow.formats.checksums import sha256_file
from corrflow.transfer.verified import TransferError
from corrflow.transfer.backends import LocalSource, SFTPSource, call_with_retries, is_transient, pull_files, verified_pull

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    if not Path(SSHD).exists():
        pytest.fail("sshd not found: install Debian's openssh-server (the Makefile's install target does)")
    home = tmp_path_factory.mktemp("sshd")
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(home / "host_key")], check=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(home / "client_key")], check=True)
    (home / "authorized_keys").write_text((home / "client_key.pub").read_text())
    os.chmod(home / "authorized_keys", 0o600)
    port = free_port()
    config = home / "sshd_config"
    config.write_text(
        "\n".join(
            [
                f"Port {port}",
                "ListenAddress 127.0.0.1",
                f"HostKey {home / 'host_key'}",
                f"AuthorizedKeysFile {home / 'authorized_keys'}",
                f"PidFile {home / 'sshd.pid'}",
                "PasswordAuthentication no",
                "KbdInteractiveAuthentication no",
                "PubkeyAuthentication yes",
                "PermitRootLogin prohibit-password",
                "StrictModes no",
                "UsePAM no",
                "Subsystem sftp internal-sftp",
                "LogLevel ERROR",
            ]
        )
        + "\n"
    )
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege-separation directory
    host_pub = (home / "host_key.pub").read_text().split()
    (home / "known_hosts").write_text(f"[127.0.0.1]:{port} {host_pub[0]} {host_pub[1]}\n")
    process = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stderr=open(home / "sshd.log", "wb"))
    deadline = time.monotonic() + 20
    import socket

    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"sshd exited: {(home / 'sshd.log').read_text()}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.1)
    yield {"port": port, "key": home / "client_key", "known_hosts": home / "known_hosts", "pid": process.pid, "home": home}
    process.terminate()
    process.wait(10)


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "beamline storage"  # a space: remote paths must be quoted
    (root / "scan1").mkdir(parents=True)
    rng = np.random.default_rng(1)
    files = {}
    for name, size in (("scan1/proj.h5", 3_000_000), ("scan1/dark.h5", 20_000), ("scan1/tomo.nxs", 1)):
        (root / name).write_bytes(rng.integers(0, 256, size, dtype=np.uint8).tobytes())
        files[name] = size
    return root, files


def _sftp(sshd, root, **kw) -> SFTPSource:
    import getpass

    return SFTPSource(
        host="127.0.0.1",
        port=sshd["port"],
        username=getpass.getuser(),
        root=str(root),
        key_file=kw.get("key", sshd["key"]),
        known_hosts_file=sshd["known_hosts"],
        timeout_s=10,
    )


def test_sftp_pull_copies_and_verifies_every_file_with_server_side_hashes(sshd, tree, tmp_path):
    root, files = tree
    source = _sftp(sshd, root)
    dest = tmp_path / "compute"
    try:
        assert source.sha256("scan1/proj.h5") == sha256_file(root / "scan1/proj.h5")  # computed by the server
        manifest = pull_files(source, sorted(files), destination_root=dest, chunk_bytes=256 * 1024)
    finally:
        source.close()
    for entry in manifest.files:
        assert (dest / entry.relative_path).read_bytes() == (root / entry.relative_path).read_bytes()
        assert entry.sha256 == hashlib.sha256((root / entry.relative_path).read_bytes()).hexdigest()
    on_disk = json.loads((dest / "manifest.json").read_text())
    assert on_disk["source_root"].startswith("sftp://") and on_disk["total_bytes"] == sum(files.values())
    assert not list(dest.rglob("*.part"))


@pytest.mark.fault("transfer cut at 50 %")
def test_sftp_transfer_cut_at_half_resumes_and_verifies(sshd, tree, tmp_path):
    root, files = tree
    src = root / "scan1/proj.h5"
    dest = tmp_path / "compute" / "scan1/proj.h5"
    dest.parent.mkdir(parents=True)
    half = files["scan1/proj.h5"] // 2
    dest.with_name("proj.h5.part").write_bytes(src.read_bytes()[:half])  # a copy cut at 50 %
    seen = []
    source = _sftp(sshd, root)
    try:
        result = verified_pull(source, "scan1/proj.h5", dest, chunk_bytes=64 * 1024, progress=lambda r, done, total: seen.append(done))
    finally:
        source.close()
    assert dest.read_bytes() == src.read_bytes() and result.sha256 == sha256_file(src)
    assert seen[0] > half, "the copy started over instead of resuming"
    assert seen[-1] - half == files["scan1/proj.h5"] - half  # only the missing half travelled


def test_dropped_connection_is_retried_with_backoff_and_resumes(sshd, tree, tmp_path, caplog):
    """Kill the server side of the SSH session at 50 %: a transient error; reconnect, resume, verify."""
    root, files = tree
    size = files["scan1/proj.h5"]
    listener = psutil.Process(sshd["pid"])
    killed = []
    progress = []

    def cut_at_half(relative, done, total):
        progress.append(done)
        if not killed and relative == "scan1/proj.h5" and done >= total // 2:
            for child in listener.children(recursive=True):  # the per-connection sshd processes
                child.kill()
            killed.append(done)

    source = _sftp(sshd, root)
    caplog.set_level(logging.WARNING, logger="corrflow.transfer.backends")
    try:
        manifest = pull_files(
            source, ["scan1/proj.h5"], destination_root=tmp_path / "compute", retries=3, retry_delay_s=0.05,
            chunk_bytes=64 * 1024, progress=cut_at_half,
        )
    finally:
        source.close()
    assert killed, "the connection was never cut"
    assert any("transient error" in r.getMessage() for r in caplog.records)
    assert (tmp_path / "compute/scan1/proj.h5").read_bytes() == (root / "scan1/proj.h5").read_bytes()
    assert manifest.files[0].sha256 == sha256_file(root / "scan1/proj.h5")
    resumed_from = min(d for d in progress[progress.index(killed[0]) + 1 :])
    assert resumed_from > size // 4, "the retry started over instead of resuming from the partial file"


@pytest.mark.fault("corruption after transfer")
def test_corrupted_destination_is_detected_and_resent_over_sftp(sshd, tree, tmp_path):
    root, files = tree
    dest = tmp_path / "compute"
    source = _sftp(sshd, root)
    try:
        pull_files(source, sorted(files), destination_root=dest)
        corrupt = dest / "scan1/proj.h5"
        data = bytearray(corrupt.read_bytes())
        data[len(data) // 3] ^= 0x01
        corrupt.write_bytes(bytes(data))
        again = pull_files(source, sorted(files), destination_root=dest)
    finally:
        source.close()
    by_name = {f.relative_path: f for f in again.files}
    assert by_name["scan1/proj.h5"].resent and by_name["scan1/dark.h5"].skipped
    assert corrupt.read_bytes() == (root / "scan1/proj.h5").read_bytes()


def test_permanent_errors_fail_at_once_without_retries(sshd, tree, tmp_path):
    root, _ = tree
    source = _sftp(sshd, root)
    start = time.perf_counter()
    try:
        with pytest.raises(FileNotFoundError):
            pull_files(source, ["scan1/missing.h5"], destination_root=tmp_path / "c", retries=3, retry_delay_s=2.0)
    finally:
        source.close()
    assert time.perf_counter() - start < 2.0, "a missing file was retried"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "stranger")], check=True)
    import paramiko

    stranger = _sftp(sshd, root, key=tmp_path / "stranger")
    with pytest.raises(paramiko.AuthenticationException):
        pull_files(stranger, ["scan1/tomo.nxs"], destination_root=tmp_path / "c", retries=3, retry_delay_s=2.0)
    assert not (tmp_path / "c" / "manifest.json").exists()


def test_retries_back_off_exponentially_on_transient_errors_only():
    delays, calls = [], []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError("peer reset")
        return "ok"

    assert call_with_retries(flaky, retries=4, delay_s=0.5, what="x", sleep=delays.append) == "ok"
    assert delays == [0.5, 1.0] and len(calls) == 3
    calls.clear()

    def corrupt():
        calls.append(1)
        raise TransferError("hash mismatch")

    with pytest.raises(TransferError):
        call_with_retries(corrupt, retries=4, delay_s=0.5, what="x", sleep=delays.append)
    assert len(calls) == 1
    with pytest.raises(ConnectionResetError):
        call_with_retries(lambda: (_ for _ in ()).throw(ConnectionResetError()), retries=2, delay_s=0.0, what="x", sleep=lambda s: None)
    assert is_transient(TimeoutError()) and not is_transient(PermissionError()) and not is_transient(ValueError())


def test_a_source_that_changes_during_transfer_is_never_installed(tree, tmp_path):
    """Nothing reaches its final name (nor the manifest, which the catalog step reads) unverified."""
    root, _ = tree

    class ChangingSource(LocalSource):
        calls = 0

        def sha256(self, relative):  # the file is rewritten between the two source hashes
            ChangingSource.calls += 1
            if ChangingSource.calls == 2:
                (root / relative).write_bytes(b"rewritten while copying")
            return super().sha256(relative)

    with pytest.raises(TransferError, match="changed"):
        pull_files(ChangingSource(root), ["scan1/dark.h5"], destination_root=tmp_path / "compute")
    assert not (tmp_path / "compute/scan1/dark.h5").exists()
    assert not (tmp_path / "compute/manifest.json").exists()
