"""Local files and their sha256s: what a push lists and hashes, what a pull checks already in place.

The manifest lists each file's sha256 and, for a file larger than one block, the sha256 of every block (so a pull
can verify blocks as they arrive, in parallel). No request to the store happens here.
"""

from __future__ import annotations

import hashlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from lorafleet.storage.errors import StoreError
from lorafleet.storage.manifest import RESERVED_DIR, FileEntry, check_relative_path
from lorafleet.storage.settings import MiB

HASH_BLOCK = 8 * MiB  # read size when hashing a local file
STREAM_BLOCK = 1 * MiB  # piece size when hashing a response body as it streams in
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()


@dataclass(frozen=True)
class LocalFile:
    path: str  # relative, POSIX
    abspath: Path
    size: int
    mtime_ns: int  # with size, tells a file that changed while it was uploaded


def scan_folder(src: Path) -> list[LocalFile]:
    """Regular files under src (symlinks followed, as in a Hugging Face snapshot), sorted by path."""
    if not src.is_dir():
        raise StoreError(f"{src} is not a folder: push takes the folder holding the adapter or model files")
    out: list[LocalFile] = []
    for dirpath, dirnames, filenames in os.walk(src, followlinks=True):
        rel_dir = Path(dirpath).relative_to(src)
        if rel_dir == Path("."):
            dirnames[:] = [d for d in dirnames if d != RESERVED_DIR]  # a pulled folder's bookkeeping
        for name in filenames:
            p = Path(dirpath) / name
            st = p.stat()
            rel = (rel_dir / name).as_posix()
            try:
                check_relative_path(rel)
            except ValueError as e:
                raise StoreError(f"cannot push {p}: {e}") from e
            out.append(LocalFile(rel, p, st.st_size, st.st_mtime_ns))
    if not out:
        raise StoreError(f"{src} holds no files: nothing to push")
    return sorted(out, key=lambda f: f.path)


class FileHasher:
    """sha256 of a whole stream and, with a block size, of each block of it, fed in pieces of any size."""

    def __init__(self, block_size: int | None = None) -> None:
        self.file = hashlib.sha256()
        self.block_size = block_size
        self.blocks: list[str] = []
        self._block = hashlib.sha256()
        self._in_block = 0
        self.size = 0

    def update(self, data: bytes | memoryview) -> None:
        self.file.update(data)  # hashlib releases the GIL on large buffers: this overlaps the transfer threads
        self.size += len(data)
        if not self.block_size:
            return
        pos, n = 0, len(data)
        while pos < n:
            take = min(n - pos, self.block_size - self._in_block)
            self._block.update(data[pos : pos + take])
            self._in_block += take
            pos += take
            if self._in_block == self.block_size:
                self.blocks.append(self._block.hexdigest())
                self._block, self._in_block = hashlib.sha256(), 0

    def result(self) -> tuple[str, list[str] | None]:
        blocks = self.blocks + ([self._block.hexdigest()] if self._in_block else [])
        return self.file.hexdigest(), (blocks if len(blocks) > 1 else None)


def hash_file(path: Path, block_size: int | None = None) -> tuple[str, list[str] | None]:
    """sha256 of the file and, when it spans several blocks, of each block, in one read."""
    size = path.stat().st_size
    # Block hashes only for files of several blocks (the manifest lists none otherwise): half the CPU for the rest.
    hasher = FileHasher(block_size if block_size and size > block_size else None)
    buf = bytearray(HASH_BLOCK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            hasher.update(view[:n])
    return hasher.result()


def sha256_file(path: Path, cancelled: threading.Event) -> str:
    """The file's sha256, stopping at the next read once cancelled (a push that failed elsewhere)."""
    h = hashlib.sha256()
    buf = bytearray(HASH_BLOCK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            if cancelled.is_set():
                raise StoreError("cancelled")
            h.update(view[:n])
    return h.hexdigest()


def block_hashes(path: Path, block_size: int) -> list[str]:
    hashes = []
    with open(path, "rb", buffering=0) as f:
        while block := f.read(block_size):
            hashes.append(hashlib.sha256(block).hexdigest())
    return hashes


def file_entry(f: LocalFile, block_size: int, pool: ThreadPoolExecutor | None = None) -> FileEntry:
    """The manifest entry of a local file. With a pool, the file hash and the block hashes run in two threads
    (two reads, the second from the page cache): on a machine with spare cores hashing takes half as long."""
    if pool is None or f.size <= block_size:
        sha, blocks = hash_file(f.abspath, block_size)
    else:
        later = pool.submit(block_hashes, f.abspath, block_size)
        sha, blocks = hash_file(f.abspath)[0], later.result()
    return FileEntry(path=f.path, sha256=sha, size=f.size, blocks=blocks)


def verify_local(path: Path, entry: FileEntry) -> bool:
    """Whether the file at path is already the manifest's entry (size, then sha256): a pull skips it."""
    try:
        return path.stat().st_size == entry.size and hash_file(path)[0] == entry.sha256
    except FileNotFoundError:
        return False
