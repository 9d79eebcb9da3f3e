"""The shared store's commit protocol on fsspec's in-memory filesystem: blobs by sha256, the manifest written last and
conditionally, a loser that adopts the winner's entry, and readers that trust only intact entries."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from tasks.core.config import ConfigError
from tasks.core.config_load import load_config
from tasks.core.manifest import MANIFEST
from tasks.core.remote import Remote
from tasks.core.store import RemoteError, Store

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def url() -> str:
    return f"memory://boothflow-test/{uuid.uuid4().hex}"  # the memory filesystem is one per process


def _machines(tmp_path: Path, url: str) -> tuple[Store, Store]:
    return Store(tmp_path / "a", Remote(url)), Store(tmp_path / "b", Remote(url))


def _write(text: str, calls: list[str] | None = None):
    def build(folder: Path) -> dict:
        if calls is not None:
            calls.append(text)
        (folder / "out.txt").write_text(text)
        (folder / "sub").mkdir()
        (folder / "sub" / "same.bin").write_bytes(b"\x01" * 1000)
        return {"items": 2}

    return build


def _files(entry_path: Path) -> dict[str, bytes]:
    return {str(f.relative_to(entry_path)): f.read_bytes() for f in sorted(entry_path.rglob("*")) if f.is_file()}


def test_an_entry_built_on_one_machine_is_downloaded_not_built_on_another(tmp_path: Path, url: str) -> None:
    a, b = _machines(tmp_path, url)
    built = a.get_or_create("stage", "k1", _write("hello"), {"x": 1})
    assert built.created
    remote = a.remote
    assert remote.manifest("stage", "k1") == (built.path / MANIFEST).read_bytes()
    assert sorted(remote.fs.ls(f"{remote.base}/blobs", detail=False)) == sorted(
        f"{remote.base}/blobs/{meta['sha256']}" for meta in built.manifest["files"].values()
    )
    calls: list[str] = []
    served = b.get_or_create("stage", "k1", _write("other", calls))
    assert (calls, served.created) == ([], False)
    assert _files(served.path) == _files(built.path) | {"stat-memo.json": _files(served.path)["stat-memo.json"]}
    assert b.get("stage", "k1").manifest == built.manifest  # now a local hit, intact under the stat memo
    assert b.verify().damaged == []


def test_a_plain_lookup_downloads_and_fetch_false_does_not(tmp_path: Path, url: str) -> None:
    a, b = _machines(tmp_path, url)
    a.get_or_create("stage", "k1", _write("hello"))
    assert b.get("stage", "k1", fetch=False) is None and b.in_remote("stage", "k1")
    assert not b.path("stage", "k1").exists()
    assert b.get("stage", "k1").path.joinpath("out.txt").read_text() == "hello"
    assert a.get("stage", "missing") is None and not a.in_remote("stage", "missing")


def test_the_first_manifest_wins_and_the_loser_adopts_the_winners_entry(tmp_path: Path, url: str) -> None:
    """B builds, and while it does, A builds and commits the same key with other bytes (as timings make them)."""
    a, b = _machines(tmp_path, url)

    def b_build(folder: Path) -> dict:
        a.get_or_create("stage", "k1", _write("from a"))
        return _write("from b")(folder)

    adopted = b.get_or_create("stage", "k1", b_build)
    assert adopted.created  # B did the work, and then took A's entry
    assert (adopted.path / "out.txt").read_text() == "from a"
    remote_manifest = a.remote.manifest("stage", "k1")
    assert (a.path("stage", "k1") / MANIFEST).read_bytes() == remote_manifest == (adopted.path / MANIFEST).read_bytes()
    assert adopted.manifest == json.loads(remote_manifest)
    assert b.verify().damaged == [] and b.get("stage", "k1").manifest == adopted.manifest
    assert a.remote.verify() == (1, [])


def test_a_damaged_blob_is_never_trusted_and_the_entry_is_built_here(tmp_path: Path, url: str, caplog) -> None:
    a, b = _machines(tmp_path, url)
    built = a.get_or_create("stage", "k1", _write("hello"))
    blob = a.remote.blob_path(built.manifest["files"]["out.txt"]["sha256"])
    a.remote.fs.pipe_file(blob, b"HELLO")  # same size, other bytes
    entries, problems = a.remote.verify()
    assert entries == 1 and problems == [f"stage/k1: out.txt: blob {blob.rsplit('/', 1)[1]} does not hash to its name"]

    assert b.get("stage", "k1") is None  # not downloaded: nothing local to trust
    assert not b.path("stage", "k1").exists() and not list((tmp_path / "b" / "stage").glob("*partial*"))
    assert "is not used: out.txt: blob" in caplog.text
    with pytest.raises(RemoteError, match="committed by another machine and is damaged"):
        b.get_or_create("stage", "k1", _write("hello!"))  # it builds, loses to the damaged entry, says so
    assert not b.path("stage", "k1").exists()


def test_a_missing_blob_or_manifest_leaves_nothing_trusted(tmp_path: Path, url: str) -> None:
    a, b = _machines(tmp_path, url)
    built = a.get_or_create("stage", "k1", _write("hello"))
    a.remote.fs.rm_file(a.remote.blob_path(built.manifest["files"]["sub/same.bin"]["sha256"]))
    assert b.get("stage", "k1") is None
    assert a.remote.verify()[1] == [f"stage/k1: sub/same.bin: blob {built.manifest['files']['sub/same.bin']['sha256']}"
                                    " is missing"]  # fmt: skip
    a.remote.fs.pipe_file(a.remote.manifest_path("stage", "k2"), b"{not json")
    assert b.get("stage", "k2") is None
    assert a.remote.verify()[1][-1] == "stage/k2: manifest.json unreadable"
    escape = {"files": {"../../escaped.txt": built.manifest["files"]["out.txt"]}}
    a.remote.fs.pipe_file(a.remote.manifest_path("stage", "k3"), json.dumps(escape).encode())
    assert b.get("stage", "k3") is None and not (tmp_path / "b" / "escaped.txt").exists()


def test_a_killed_download_leaves_a_partial_that_is_cleared_and_redone(tmp_path: Path, url: str) -> None:
    a, b = _machines(tmp_path, url)
    a.get_or_create("stage", "k1", _write("hello"))
    leftover = b.path("stage", "k1").with_name("k1.partial-deadbeef")
    leftover.mkdir(parents=True)
    (leftover / "out.txt").write_text("hel")
    assert b.get("stage", "k1").path.joinpath("out.txt").read_text() == "hello"
    assert not leftover.exists()


def test_files_shared_by_entries_are_uploaded_once(tmp_path: Path, url: str) -> None:
    a, _ = _machines(tmp_path, url)
    a.get_or_create("items", "i1", _write("one"))
    a.get_or_create("stage", "s1", _write("two"))
    blobs = a.remote.fs.ls(f"{a.remote.base}/blobs", detail=False)
    assert len(blobs) == 3  # out.txt twice (other bytes), sub/same.bin once
    assert a.remote.keys() == [("items", "i1"), ("stage", "s1")]


def test_an_unreachable_store_fails_in_one_line_naming_the_setting(monkeypatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    once = {"retries": {"max_attempts": 1}, "connect_timeout": 1}  # nothing listens there: no retries to wait for
    remote = Remote("s3://boothflow-test/x", {"endpoint_url": "http://127.0.0.1:9", "config_kwargs": once})
    with pytest.raises(RemoteError, match=r"^run.store = 's3://boothflow-test/x': could not list it") as caught:
        remote.check()
    assert "EndpointConnectionError" in caught.value.message and "\n" not in caught.value.message


@pytest.mark.parametrize(
    ("override", "said"),
    [
        (
            "run.store='bucket/prefix'",
            "run.store = 'bucket/prefix': Value error, must be a URL like s3://bucket/prefix",
        ),
        ("run.store='nosuch://b/p'", "run.store = 'nosuch://b/p': Value error, must be a URL like"),
        ("run.store='s3://'", "run.store = 's3://': Value error, must be a URL like"),
        ("run.store_options={secret='x'}", "secret: credentials never go in a config"),
        ("run.store_options={AWS_SECRET_ACCESS_KEY='x'}", "aws_secret_access_key: credentials never go in a config"),
    ],
)
def test_store_settings_are_checked_before_any_stage(override: str, said: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(None, [override])
    assert said in str(caught.value) and "\n" not in str(caught.value)


def test_photos_at_a_url_are_mirrored_with_their_times_and_kept_in_step(tmp_path: Path, url: str) -> None:
    import fsspec

    from tasks.core.photos import mirror, mirror_of

    fs, base = fsspec.core.url_to_fs(url)
    fs.pipe_file(f"{base}/a.png", b"one")
    fs.pipe_file(f"{base}/sub/b.png", b"two")
    folder = mirror(url, tmp_path)
    assert folder == mirror_of(url, tmp_path) and folder.is_relative_to(tmp_path / ".photos")
    assert {str(f.relative_to(folder)): f.read_bytes() for f in folder.rglob("*") if f.is_file()} == {
        "a.png": b"one", "sub/b.png": b"two"}  # fmt: skip
    modified = fs.info(f"{base}/a.png")["created"]
    assert abs((folder / "a.png").stat().st_mtime - modified.timestamp()) < 1  # settle_minutes reads the URL's time

    fs.pipe_file(f"{base}/a.png", b"ONE")  # the same size, a new version
    fs.rm_file(f"{base}/sub/b.png")
    fs.pipe_file(f"{base}/c.png", b"three")
    mirror(url, tmp_path)
    assert {str(f.relative_to(folder)): f.read_bytes() for f in folder.rglob("*") if f.is_file()} == {
        "a.png": b"ONE", "c.png": b"three"}  # fmt: skip
    written = (folder / "c.png").stat().st_ctime_ns
    fs.pipe_file(f"{base}/sub/b.png", b"two")
    mirror(url, tmp_path)
    assert (folder / "sub" / "b.png").read_bytes() == b"two"
    assert (folder / "c.png").stat().st_ctime_ns == written  # unchanged at the URL: not downloaded again


def test_photos_at_a_url_are_checked_before_any_stage(tmp_path: Path, url: str) -> None:
    from flows.preflight import check_settings

    config = load_config(None, [f"data.instance_dir='{url}/nothing'"], tmp_path / "artifacts")
    with pytest.raises(ConfigError, match=r"^data.instance_dir = 'memory://.*/nothing' holds no files"):
        check_settings(config)
    assert isinstance(load_config(None, ["data.instance_dir='s3://bucket/rex'"]).data.instance_dir, str)


def test_the_shared_store_benchmark_runs_and_reports_each_figure(tmp_path: Path) -> None:
    from benchmark_quick import quick_results, table_row

    text = quick_results("shared_store.py", tmp_path)
    assert "moto over loopback" in text and "not S3" in text
    hit = float(table_row(text, "B: local hit (median)")[1])
    remote = float(table_row(text, "B: remote hit (download, hash-check, commit locally; median)")[1])
    assert 0 < hit < remote


def test_a_subjects_folder_at_a_url_lists_its_subfolders_and_their_settings(tmp_path: Path, url: str) -> None:
    import fsspec

    from tasks.core.subjects import list_subjects
    from tasks.core.values import folder_or_url

    fs, base = fsspec.core.url_to_fs(url)
    fs.pipe_file(f"{base}/subjects/alice/a.png", b"a")
    fs.pipe_file(f"{base}/subjects/rex/r.png", b"r")
    fs.pipe_file(f"{base}/subjects/rex/subject.toml", b'[data]\ntoken = "zwx"\n')
    fs.pipe_file(f"{base}/subjects/.cache/x.png", b"x")
    fs.pipe_file(f"{base}/subjects/bad name/b.png", b"b")
    root = folder_or_url(f"{url}/subjects")
    assert root == f"{url}/subjects" and folder_or_url("data") == REPO / "data"  # a URL as it is, a folder absolute
    _, found = list_subjects(root, None, [], tmp_path / "artifacts")
    assert [s.name for s in found] == ["alice", "bad name", "rex"]
    alice, bad, rex = found
    assert alice.config.data.instance_dir == f"{url}/subjects/alice" and alice.config.data.token == "sks"
    assert rex.config.data.token == "zwx" and bad.config is None and "its name becomes the run's" in bad.problem
    with pytest.raises(ConfigError, match=r"^subjects folder 'memory://.*/nowhere' does not exist"):
        list_subjects(f"{url}/nowhere", None, [], tmp_path / "artifacts")
