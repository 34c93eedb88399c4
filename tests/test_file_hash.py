"""file_sha256: the digest of the whole file, whatever its size relative to the read chunk."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from kdlab.file_hash import file_sha256


@pytest.mark.parametrize("size", [0, 5, (1 << 20) + 3])  # empty, one short chunk, more than one chunk
def test_file_sha256_is_the_sha256_of_the_bytes(tmp_path: Path, size: int) -> None:
    data = bytes(i % 251 for i in range(size))
    path = tmp_path / "blob.bin"
    path.write_bytes(data)
    assert file_sha256(path) == file_sha256(str(path)) == hashlib.sha256(data).hexdigest()


def test_file_sha256_of_known_bytes(tmp_path: Path) -> None:
    (tmp_path / "abc").write_bytes(b"abc")
    assert file_sha256(tmp_path / "abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_file_sha256_matches_the_teacher_and_cache_digests(tmp_path: Path) -> None:
    from kdlab.distill.teacher import file_sha256 as teacher_sha256

    path = tmp_path / "ckpt.pth"
    path.write_bytes(b"weights" * 1000)
    assert file_sha256(path) == teacher_sha256(path)
