"""File hashes remembered on disk: a later memo reads no unchanged file, any change of stat (ctime included) or a
file too young to trust is read again, an unusable memo only costs reads, and every identity equals the memo-less one.

"A later process" is a fresh `HashMemo` on the same root: the memo keeps nothing in the process between two opens.
"""

import os
import shutil
import sqlite3
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest

from flows.operate import serve_files
from flows.server import free_port
from tasks.core import hash_memo
from tasks.core.config_load import load_config
from tasks.core.hash_memo import MEMO_FILE, HashMemo
from tasks.core.manifest import file_sha256
from tasks.core.store import Store
from tasks.sd.models import component_identity, resolve
from tasks.sd.presets import SHIPPED_FOLDER
from tasks.sd.scoring import model_identity
from tasks.stages import preprocess

REPO = Path(__file__).resolve().parents[1]
A_LONG_TIME_AGO_NS = 1_000_000_000_000_000_000  # 2001


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the files whose bytes the memo reads, in order."""
    names: list[str] = []
    real = hash_memo.file_sha256
    monkeypatch.setattr(hash_memo, "file_sha256", lambda path: names.append(path.name) or real(path))
    return names


@pytest.fixture
def settled(monkeypatch: pytest.MonkeyPatch) -> None:
    """The memo's clock 10 s ahead: files written by the test are past the racy window, as a real run's are."""
    monkeypatch.setattr(hash_memo, "time", SimpleNamespace(time_ns=lambda: time.time_ns() + 10_000_000_000))


@pytest.fixture
def files(tmp_path: Path) -> list[Path]:
    folder = tmp_path / "files"
    folder.mkdir()
    for name, size in (("a.bin", 3_000_000), ("b.bin", 10)):
        (folder / name).write_bytes(os.urandom(size))
    return sorted(folder.iterdir())


def hashed(root: Path | None, paths: list[Path]) -> list[str]:
    with HashMemo(root) as memo:
        return [memo.sha256(p) for p in paths]


def remembered(root: Path) -> int:
    with sqlite3.connect(root / MEMO_FILE) as db:
        return db.execute("SELECT count(*) FROM files").fetchone()[0]


def test_a_later_memo_reads_no_unchanged_file(tmp_path: Path, files: list[Path], reads: list[str], settled) -> None:
    expected = [file_sha256(p) for p in files]
    assert hashed(tmp_path, files) == expected
    assert reads == ["a.bin", "b.bin"] and remembered(tmp_path) == 2
    assert hashed(tmp_path, files) == expected
    assert hashed(tmp_path, files[::-1]) == expected[::-1]
    assert reads == ["a.bin", "b.bin"]


def test_a_file_changed_in_place_is_read_again(tmp_path: Path, files: list[Path], reads: list[str], settled) -> None:
    before = hashed(tmp_path, files)
    time.sleep(0.02)  # the change lands in a later clock tick than the copy, as it would after 2 s
    changed, stat = files[0], files[0].stat()
    with changed.open("r+b") as f:  # same size, same inode, the mtime put back: only the ctime tells
        f.seek(1234)
        byte = f.read(1)[0]
        f.seek(1234)
        f.write(bytes([byte ^ 1]))
    os.utime(changed, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    now = changed.stat()
    assert (now.st_size, now.st_mtime_ns, now.st_ino) == (stat.st_size, stat.st_mtime_ns, stat.st_ino)
    reads.clear()
    after = hashed(tmp_path, files)
    assert reads == ["a.bin"]
    assert after == [file_sha256(changed), before[1]] and after[0] != before[0]
    assert hashed(tmp_path, files) == after and reads == ["a.bin"]  # the new digest is remembered in its place


def test_a_file_in_the_racy_window_is_not_remembered(tmp_path: Path, files: list[Path], reads: list[str]) -> None:
    old_mtime = files[1]  # the other was written just now; this one's mtime says 2001, but its ctime is just now
    os.utime(old_mtime, ns=(A_LONG_TIME_AGO_NS, A_LONG_TIME_AGO_NS))
    assert hashed(tmp_path, files) == hashed(tmp_path, files) == [file_sha256(p) for p in files]
    assert reads == ["a.bin", "b.bin"] * 2
    assert remembered(tmp_path) == 0


def _read_only(monkeypatch: pytest.MonkeyPatch, memo: Path) -> None:
    """The memo as sqlite opens a file it may not write (chmod would not stop the root user that the suite may be)."""
    hashed(memo.parent.parent, [])  # the memo exists, with its table
    connect = sqlite3.connect
    monkeypatch.setattr(sqlite3, "connect", lambda file, timeout: connect(f"file:{file}?mode=ro", timeout, uri=True))


UNUSABLE = {
    "damaged": lambda monkeypatch, memo: memo.write_bytes(b"not a database, " * 512),
    "a folder in its place": lambda monkeypatch, memo: memo.mkdir(),
    "read-only": _read_only,
}


@pytest.mark.parametrize("case", UNUSABLE)
def test_an_unusable_memo_costs_reads_never_an_error(
    case: str, tmp_path: Path, files: list[Path], reads: list[str], settled, monkeypatch: pytest.MonkeyPatch
) -> None:
    memo = tmp_path / MEMO_FILE
    memo.parent.mkdir()
    UNUSABLE[case](monkeypatch, memo)
    left = memo.read_bytes() if memo.is_file() else None
    expected = [file_sha256(p) for p in files]
    assert hashed(tmp_path, files) == hashed(tmp_path, files) == expected
    assert reads == ["a.bin", "b.bin"] * 2
    assert (memo.read_bytes() if memo.is_file() else None) == left  # nothing of the user's is replaced


def test_no_root_or_a_root_that_cannot_hold_the_memo_remembers_nothing(tmp_path: Path, files, reads, settled) -> None:
    not_a_folder = files[1]
    for root in (None, tmp_path / "not yet made", not_a_folder):
        assert hashed(root, files) == hashed(root, files) == [file_sha256(p) for p in files]
    assert reads == ["a.bin", "b.bin"] * 6
    assert not (tmp_path / "not yet made").exists()  # the memo never makes the artifact root


def test_model_and_photo_identities_equal_the_memo_less_ones(tmp_path: Path, reads: list[str], settled) -> None:
    model = shutil.copytree(SHIPPED_FOLDER / "toy-sd", tmp_path / "toy-sd")
    encoder = str(model / "text_encoder")  # a local metric model folder, as evaluate.clip_model may be
    images = shutil.copytree(REPO / "data" / "toy", tmp_path / "images")
    root = tmp_path / "artifacts"
    root.mkdir()
    config = load_config(None, [f"data.instance_dir='{images}'"], artifacts=root)
    resolved = resolve(str(model), str(model / "vae"), root)
    inputs = preprocess.PreprocessInputs.of(config)
    metric = model_identity(encoder, root)
    model_files = {p.name for c in resolved.identities for p in (model / c).rglob("*") if p.is_file()}
    assert set(reads) == model_files | {p.name for p in images.iterdir()}

    memo_less = {c: component_identity(model, c) for c in resolved.identities}
    assert resolved.identities == memo_less | {"vae": component_identity(model / "vae", "")}
    assert inputs.files == preprocess.scan(images)
    assert metric == model_identity(encoder) == model_identity(encoder, tmp_path)  # the root is never in it

    reads.clear()  # a later run: the same identities, no byte read
    assert resolve(str(model), str(model / "vae"), root).identities == resolved.identities
    assert preprocess.PreprocessInputs.of(config).fingerprint == inputs.fingerprint
    assert model_identity(encoder, root) == metric
    assert reads == []


def test_the_memo_is_neither_a_store_entry_nor_served(tmp_path: Path, files: list[Path], settled) -> None:
    hashed(tmp_path, files)
    assert (tmp_path / MEMO_FILE).is_file() and list(Store(tmp_path).entries()) == []
    port = free_port()
    server = serve_files(tmp_path, port)
    try:
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/{MEMO_FILE.as_posix()}", timeout=10)
        assert refused.value.code == 404
    finally:
        server.shutdown()
        server.server_close()
