"""Minted credentials read from a mounted Secret volume, again whenever the kubelet has replaced them.

Environment variables are fixed when a container starts; a Secret volume is updated in place by the kubelet
(an atomic swap of its `..data` link, within about a minute of the Secret's change). A long-running reader
(the serving sidecar) therefore reads its keys from files, and `FileCredentials.current` returns the values as
they are now, so keys the operator renewed are used before the old ones expire.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

from lorafleet.storage.errors import StoreError
from lorafleet.storage.scrub import remember
from lorafleet.storage.sts_policy import SECRET_KEYS

# A minted key set is a few KiB (MinIO's session token ~1 KiB, AWS's up to ~2 KiB); a bigger file is not ours.
MAX_FILE_BYTES = 16 * 1024


@dataclass(frozen=True)
class KeySet:
    access_key_id: str = field(repr=False)
    secret_access_key: str = field(repr=False)
    session_token: str = field(repr=False)


class FileCredentials:
    """The key set in `directory` (files named as storage.sts_policy.SECRET_KEYS), re-read when it changed.

    Thread-safe. A missing, oversized or empty file is a StoreError naming the file (never its content)."""

    def __init__(self, directory: Path) -> None:
        self._dir = directory
        self._lock = threading.Lock()
        self._stamp: tuple[int, ...] | None = None
        self._keys: KeySet | None = None

    def _read(self, name: str) -> str:
        path = self._dir / name
        try:
            with path.open("rb") as handle:
                raw = handle.read(MAX_FILE_BYTES + 1)
        except OSError as exc:
            raise StoreError(f"store credentials file {path} cannot be read ({exc.strerror})") from None
        value = raw.decode("utf-8", errors="replace").strip()
        if not value or len(raw) > MAX_FILE_BYTES:
            raise StoreError(f"store credentials file {path} is empty or over {MAX_FILE_BYTES} bytes")
        return value

    def _stamp_now(self) -> tuple[int, ...]:
        """The files' identities: the kubelet writes a new timestamped folder and swaps a link to it, so a
        renewal changes every file's inode and mtime."""
        stamp: list[int] = []
        for name in SECRET_KEYS:
            try:
                info = (self._dir / name).stat()
            except OSError:
                return ()
            stamp += [info.st_ino, info.st_mtime_ns, info.st_size]
        return tuple(stamp)

    def current(self) -> KeySet:
        with self._lock:
            stamp = self._stamp_now()
            if self._keys is None or not stamp or stamp != self._stamp:
                values = [self._read(name) for name in SECRET_KEYS]
                remember(values[1], values[2], key_id=values[0])  # never in an error or a log line
                self._keys, self._stamp = KeySet(*values), stamp
            return self._keys
