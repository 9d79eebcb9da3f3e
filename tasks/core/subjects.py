"""A subjects folder: every subfolder of ROOT is one subject, named by the folder and trained from its images, with
the settings of an optional `subject.toml` inside it on top of the night's base config.

    subjects/
      alice/  photo1.jpg ...             # trains as run `alice` with the base config
      rex/    subject.toml  img_01.png   # subject.toml: [data] token = "zwx"  class_name = "dog"

The folder is listed when a night starts, so a deployment trains what is there tonight. A subject whose settings
do not load gets its one-line problem instead of a config, and fails alone. The folder may be a URL
(`s3://bucket/subjects`): each of its subfolders is then a subject whose photos are read from their URL.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import fsspec

from tasks.core.config import ConfigError, RunConfig
from tasks.core.config_load import load_config
from tasks.core.sweeps import flatten
from tasks.core.values import fsspec_url

SETTINGS_FILE = "subject.toml"
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")  # a run name, a flow run name and a folder of the store
FIXED = ("data.instance_dir", "run.name", "run.artifacts_root")  # the folder and the night set these
NIGHT_SETTLE_MINUTES = 5.0  # photos arrive during the day: one modified in the last minutes may still be copying


@dataclass(frozen=True)
class Subject:
    """One subfolder: its name, its config, or (when that does not load) the one line that says why."""

    name: str
    folder: Path | str
    config: RunConfig | None
    problem: str | None = None


def subject_folders(root: Path | str, options: dict[str, Any] | None = None) -> list[Path | str]:
    """The subfolders of `root` (at a URL: read with fsspec `options`), by name; hidden folders (`.git`, `.cache`)
    are not subjects."""
    if isinstance(root, str):
        return _subfolders_at(root, options or {})
    if not root.is_dir():
        what = "is a file" if root.is_file() else "does not exist"
        raise ConfigError(f"subjects folder {str(root)!r} {what}; give a folder with one subfolder per subject")
    return sorted(path for path in root.iterdir() if path.is_dir() and not path.name.startswith("."))


def _subfolders_at(url: str, options: dict[str, Any]) -> list[str]:
    try:
        fs, base = fsspec.core.url_to_fs(fsspec_url(url), **options)
        found = fs.ls(base, detail=True)
    except ValueError as err:
        raise ConfigError(f"subjects folder {url!r}: {err}") from None
    except FileNotFoundError:
        raise ConfigError(f"subjects folder {url!r} does not exist; give a URL with a subfolder per subject") from None
    except Exception as err:
        raise ConfigError(f"subjects folder {url!r}: could not list it ({type(err).__name__}: {err}); check the URL, "
                          "run.store_options and the credentials") from None  # fmt: skip
    names = sorted(PurePosixPath(entry["name"]).name for entry in found if entry.get("type") == "directory")
    return [f"{url.rstrip('/')}/{name}" for name in names if not name.startswith(".")]


def list_subjects(
    root: Path | str, config: Path | None, overrides: list[str], artifacts: Path | None
) -> tuple[RunConfig, list[Subject]]:
    """The night's base config and every subject of `root` with its resolved config. The base config and `--set`
    must load (else ConfigError: the whole night is misconfigured); a subject's own settings fail it alone."""
    base = load_config(config, overrides, artifacts)
    options = base.run.store_options
    return base, [_subject(folder, config, overrides, base.run.artifacts_root, options)
                  for folder in subject_folders(root, options)]  # fmt: skip


def _subject(
    folder: Path | str, config: Path | None, overrides: list[str], artifacts: Path, options: dict[str, Any]
) -> Subject:
    name = PurePosixPath(str(folder)).name
    if not NAME.match(name):
        problem = (f"subject folder {str(folder)!r}: its name becomes the run's; use letters, digits, '.', '_' or '-' "
                   "(at most 100), starting with a letter or digit")  # fmt: skip
        return Subject(name, folder, None, problem)
    try:
        own = _own_settings(folder, options)
        where = folder if isinstance(folder, str) else str(folder.resolve())
        settings = {**own, "data.instance_dir": where, "run.name": name}
        return Subject(name, folder, _settling(load_config(config, overrides, artifacts, settings)))
    except ConfigError as err:
        return Subject(name, folder, None, str(err))


def _settling(config: RunConfig) -> RunConfig:
    """A night leaves photos modified in its last minutes for the next night, unless a setting says otherwise."""
    if config.data.settle_minutes is not None:
        return config
    return config.model_copy(update={"data": config.data.model_copy(update={"settle_minutes": NIGHT_SETTLE_MINUTES})})


def _own_settings(folder: Path | str, options: dict[str, Any]) -> dict[str, object]:
    """A subject's `subject.toml` as dotted settings; it may set anything a `--set` could but its folder and name."""
    file = f"{folder}/{SETTINGS_FILE}" if isinstance(folder, str) else folder / SETTINGS_FILE
    try:
        settings = flatten(tomllib.loads(_read_text(file, options)))
    except FileNotFoundError:
        return {}
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{file}: not valid TOML: {err}") from None
    for name in FIXED:
        if name in settings:
            raise ConfigError(f"{file}: {name} is set by the subjects folder (the subject's folder, its name and the "
                              "night's artifact root); remove it")  # fmt: skip
    return settings


def _read_text(file: Path | str, options: dict[str, Any]) -> str:
    """A small text file, local or at a URL; FileNotFoundError when there is none."""
    if isinstance(file, Path):
        if not file.is_file():
            raise FileNotFoundError(file)
        return file.read_text(encoding="utf-8")
    try:
        fs, path = fsspec.core.url_to_fs(file, **options)
        return fs.cat_file(path).decode("utf-8")
    except (FileNotFoundError, UnicodeDecodeError):
        raise
    except Exception as err:
        raise ConfigError(f"{file}: could not read it ({type(err).__name__}: {err})") from None
