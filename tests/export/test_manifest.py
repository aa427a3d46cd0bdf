"""What opening an artifact checks: sizes always; the sha256 of a file only when its stamp changed since it
was last verified on this machine; `nextn verify` / `--verify`: every sha256."""

import os
import shutil
import subprocess
import sys

import pytest

from nextn.errors import NextnError
from nextn.export import manifest as manifest_module
from nextn.export.manifest import read_manifest

pytestmark = pytest.mark.slow


def _count_hashing(monkeypatch) -> list[str]:
    hashed = []
    real = manifest_module.sha256_file

    def counting(path, *a, **kw):
        hashed.append(path.name)
        return real(path, *a, **kw)

    monkeypatch.setattr(manifest_module, "sha256_file", counting)
    return hashed


def _nextn(*args):
    return subprocess.run([sys.executable, "-c", "from nextn.cli import main; main()", *map(str, args)],
                          capture_output=True, text=True, timeout=120)  # fmt: skip


def test_an_unchanged_artifact_opens_without_reading_its_weights(tiny_artifact, tmp_path, monkeypatch):
    art = shutil.copytree(tiny_artifact, tmp_path / "a")  # new files: never verified on this machine
    hashed = _count_hashing(monkeypatch)
    read_manifest(art, verify=True)
    assert "weights.bin" in hashed  # the first open hashes what it has not seen
    hashed.clear()
    read_manifest(art, verify=True)
    assert hashed == []  # the stamps match: nothing read
    moved = art.rename(tmp_path / "moved")  # a renamed folder keeps its identity (export renames into place)
    read_manifest(moved, verify=True)
    assert hashed == []
    read_manifest(moved, verify="full")
    assert "weights.bin" in hashed


def test_a_written_artifact_is_recorded_as_verified(tiny_checkpoint, tmp_path, monkeypatch):
    """Export hashes what it writes; opening its output right after reads no weights. (The trunk alone: what is
    recorded is every file the manifest lists, whatever the graphs; the session's artifacts cannot stand in,
    as other tests open them and record them too.)"""
    from nextn.export.exporter import ExportOptions, export_checkpoint

    out = tmp_path / "art"
    m = export_checkpoint(tiny_checkpoint, out, ExportOptions(mtp_layers=0))
    assert {"trunk.onnx", "weights.bin", "config.json"} <= set(m["files"])
    hashed = _count_hashing(monkeypatch)
    read_manifest(out, verify=True)
    assert hashed == []


def test_corruption_is_a_one_line_error(tiny_artifact, tmp_path):
    art = shutil.copytree(tiny_artifact, tmp_path / "a")
    read_manifest(art, verify=True)  # verified once at these stamps
    weights = art / "weights.bin"
    data = bytearray(weights.read_bytes())
    data[100] ^= 1
    weights.write_bytes(bytes(data))  # an edit: the stamp changes, the next open hashes it
    with pytest.raises(NextnError, match="weights.bin: sha256 mismatch"):
        read_manifest(art, verify=True)
    r = _nextn("verify", art)
    assert r.returncode == 1 and "weights.bin: sha256 mismatch" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    weights.write_bytes(bytes(data[:-10]))  # truncated
    r = _nextn("run", art, "--prompt-ids", "1,2", "--max-new-tokens", "2")
    assert r.returncode == 1 and "weights.bin: size" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_a_change_that_keeps_the_stamp_is_caught_by_verify_only(tiny_artifact, tmp_path):
    """The documented limit: bytes changed with size, mtime and inode kept (bit rot under the file system,
    or a deliberate mtime reset) pass the cheap check; `nextn verify` and `--verify` read every byte."""
    art = shutil.copytree(tiny_artifact, tmp_path / "a")
    read_manifest(art, verify=True)
    weights = art / "weights.bin"
    st = weights.stat()
    with open(weights, "r+b") as f:  # in place: same inode
        f.seek(100)
        b = f.read(1)
        f.seek(100)
        f.write(bytes([b[0] ^ 1]))
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    read_manifest(art, verify=True)  # not caught: the stamp is the verified one
    r = _nextn("verify", art)
    assert r.returncode == 1 and "sha256 mismatch" in r.stderr
    r = _nextn("run", art, "--prompt-ids", "1,2", "--max-new-tokens", "2", "--verify")
    assert r.returncode == 1 and "sha256 mismatch" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_verify_command_on_a_good_artifact(tiny_artifact):
    r = _nextn("verify", tiny_artifact)
    assert r.returncode == 0 and "every sha256 matches" in r.stdout and "files" in r.stdout
