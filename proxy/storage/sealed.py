"""Secrets the proxy must keep in its database (a registered node's ``api_key``), encrypted at rest.

The key is this installation's own: a file created at first start next to the
database (``storage.key_path``), readable by the proxy's user only (0600). A
copy of the database without the key file gives no secret away, and nothing
logged (aiosqlite logs SQL parameters at DEBUG) carries one in the clear.

Encryption is Fernet (AES-128-CBC with an HMAC-SHA256, from ``cryptography``):
authenticated, so a tampered or foreign value is refused rather than decrypted
into garbage. Sealed values are text, ``sealed:v1:<token>``, so they fit the
JSON the nodes table stores.
"""

from __future__ import annotations

import logging
import os
import stat
import time
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken

log = logging.getLogger("llm_proxy.storage")

PREFIX = "sealed:v1:"


class SealError(Exception):
    """A sealed value could not be opened (another installation's key, or a damaged value)."""


def key_path_for(database: str, configured: str = "") -> str | None:
    """Where the key lives: ``storage.key_path``, else beside the database (none for ``:memory:``)."""
    if configured:
        return configured
    if database == ":memory:" or database.startswith("file:"):
        return None
    path = Path(database)
    return str(path.with_suffix(".key") if path.suffix else path.with_name(path.name + ".key"))


class Sealer:
    def __init__(self, key: bytes, path: str | None = None) -> None:
        self._fernet = Fernet(key)
        self.path = path

    @classmethod
    def open(cls, path: str | None) -> Sealer:
        """Read the key file, creating it (mode 0600) on first start. Blocking: call it in a thread.

        ``None`` (an in-memory database) gets a key that lives as long as the process, like the data.
        """
        if path is None:
            return cls(Fernet.generate_key())
        target = Path(path).expanduser()
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            mode = target.stat().st_mode
            if mode & (stat.S_IRWXG | stat.S_IRWXO):
                log.warning("key file %s is readable by other users (mode %o); chmod 600 it", target, mode & 0o777)
            return cls(_read_key(target), str(target))
        key = Fernet.generate_key()
        with os.fdopen(fd, "wb") as f:  # O_EXCL: two workers starting at once cannot both write one
            f.write(key + b"\n")
            f.flush()
            os.fsync(f.fileno())
        log.info("created the key for secrets at rest: %s", target)
        return cls(key, str(target))

    def seal(self, secret: str) -> str:
        return PREFIX + self._fernet.encrypt(secret.encode()).decode("ascii")

    def unseal(self, value: str) -> str:
        if not value.startswith(PREFIX):
            raise SealError("not a sealed value")
        try:
            return self._fernet.decrypt(value[len(PREFIX) :].encode("ascii")).decode()
        except (InvalidToken, ValueError):
            raise SealError(f"cannot be decrypted with the key in {self.path or 'memory'}") from None


def _read_key(path: Path) -> bytes:
    # Another worker may have created the file a moment ago and not written it yet.
    for _ in range(100):
        key = path.read_bytes().strip()
        if key:
            return key
        time.sleep(0.02)
    raise SealError(f"the key file {path} is empty")
