"""The sha256 of files remembered across processes in `<artifacts>/.hashes/files.sqlite`, keyed by path and stat, so a
run reads no byte of an unchanged base model or photo that an earlier run hashed: a stat per file instead of gigabytes.

A remembered digest holds only while the file's (size, mtime_ns, ctime_ns, inode) are those it was hashed under, the
store's rule (`file_stat`). A memo that cannot be opened or written (read-only folder, damaged file) costs a re-hash,
never an error: what it returns is always the file's sha256.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from pathlib import Path

from tasks.core.manifest import file_sha256, file_stat
from tasks.core.progress import run_logger

MEMO_FILE = Path(".hashes") / "files.sqlite"  # a dot-folder of the root: never a stage, never served

# A file rewritten within the filesystem's clock tick can keep its stat: never remember the digest of a file changed
# (mtime) or touched (ctime) this recently, as git does for its index.
RACY_WINDOW_NS = 2_000_000_000

BUSY_TIMEOUT_S = 30.0  # how long a process waits for another one's write (a few rows, milliseconds) before giving up
SCHEMA = "CREATE TABLE IF NOT EXISTS files (path BLOB PRIMARY KEY, stat TEXT NOT NULL, sha256 TEXT NOT NULL)"
UPSERT = (
    "INSERT INTO files (path, stat, sha256) VALUES (?, ?, ?)"
    " ON CONFLICT (path) DO UPDATE SET stat = excluded.stat, sha256 = excluded.sha256"
)


class HashMemo:
    """`with HashMemo(root) as memo: memo.sha256(file)`; `HashMemo(None)` remembers nothing.

    Digests found while the memo is open are written in one transaction when it closes (a commit per photo would cost
    more than hashing it); nothing is held locked meanwhile, so any number of processes may share the file.
    """

    def __init__(self, root: Path | None) -> None:
        self.file = None if root is None else Path(root) / MEMO_FILE
        self._db: sqlite3.Connection | None = None
        self._found: dict[tuple[bytes, str], str] = {}  # (path, stat) -> sha256, hashed since the memo opened

    def __enter__(self) -> HashMemo:
        if self.file is not None:
            self._db = _open(self.file)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._db is None:
            return
        try:
            with self._db:
                self._db.executemany(UPSERT, [(*found, digest) for found, digest in self._found.items()])
        except sqlite3.Error as err:
            _unusable(self.file, err)
        finally:
            self._db.close()
            self._db, self._found = None, {}

    def sha256(self, file: Path) -> str:
        """The file's sha256: remembered when its stat is the one recorded, else read (and remembered unless racy).
        The stat is taken before reading, so a write during the read leaves a stat that no later lookup matches."""
        stat = file_stat(file)
        if self._db is None or stat is None or time.time_ns() - max(stat[1], stat[2]) < RACY_WINDOW_NS:
            return file_sha256(file)
        key = (os.fsencode(file.absolute()), json.dumps(stat))
        if key in self._found:
            return self._found[key]
        try:
            row = self._db.execute("SELECT sha256 FROM files WHERE path = ? AND stat = ?", key).fetchone()
        except sqlite3.Error as err:
            _unusable(self.file, err)
            self._db.close()
            self._db = None
            return file_sha256(file)
        if row is not None:
            return row[0]
        self._found[key] = file_sha256(file)
        return self._found[key]


def _open(file: Path) -> sqlite3.Connection | None:
    """The memo's connection, its table made if new; None (hash everything) when the root is missing or read-only, or
    the file is not a database."""
    try:
        file.parent.mkdir(exist_ok=True)  # never the root itself: a root that does not exist yet has nothing to keep
    except OSError:
        return None
    db = None
    try:
        db = sqlite3.connect(file, timeout=BUSY_TIMEOUT_S)
        db.execute(SCHEMA)
    except sqlite3.Error as err:
        _unusable(file, err)
        if db is not None:
            db.close()
        return None
    return db


def _unusable(file: Path | None, err: sqlite3.Error) -> None:
    run_logger().warning("hash memo %s unusable (%s): files are hashed again; delete it to start a new one", file, err)
