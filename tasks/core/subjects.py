"""A subjects folder: every subfolder of ROOT is one subject, named by the folder and trained from its images, with
the settings of an optional `subject.toml` inside it on top of the night's base config.

    subjects/
      alice/  photo1.jpg ...             # trains as run `alice` with the base config
      rex/    subject.toml  img_01.png   # subject.toml: [data] token = "zwx"  class_name = "dog"

The folder is listed when a night starts, so a deployment trains what is there tonight. A subject whose settings
do not load gets its one-line problem instead of a config, and fails alone.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

from tasks.core.config import ConfigError, RunConfig
from tasks.core.config_load import load_config
from tasks.core.sweeps import flatten

SETTINGS_FILE = "subject.toml"
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")  # a run name, a flow run name and a folder of the store
FIXED = ("data.instance_dir", "run.name", "run.artifacts_root")  # the folder and the night set these
NIGHT_SETTLE_MINUTES = 5.0  # photos arrive during the day: one modified in the last minutes may still be copying


@dataclass(frozen=True)
class Subject:
    """One subfolder: its name, its config, or (when that does not load) the one line that says why."""

    name: str
    folder: Path
    config: RunConfig | None
    problem: str | None = None


def subject_folders(root: Path) -> list[Path]:
    """The subfolders of `root`, by name; hidden folders (`.git`, `.cache`) are not subjects."""
    if not root.is_dir():
        what = "is a file" if root.is_file() else "does not exist"
        raise ConfigError(f"subjects folder {str(root)!r} {what}; give a folder with one subfolder per subject")
    return sorted(path for path in root.iterdir() if path.is_dir() and not path.name.startswith("."))


def list_subjects(
    root: Path, config: Path | None, overrides: list[str], artifacts: Path | None
) -> tuple[RunConfig, list[Subject]]:
    """The night's base config and every subject of `root` with its resolved config. The base config and `--set`
    must load (else ConfigError: the whole night is misconfigured); a subject's own settings fail it alone."""
    base = load_config(config, overrides, artifacts)
    return base, [_subject(folder, config, overrides, base.run.artifacts_root) for folder in subject_folders(root)]


def _subject(folder: Path, config: Path | None, overrides: list[str], artifacts: Path) -> Subject:
    name = folder.name
    if not NAME.match(name):
        problem = (f"subject folder {str(folder)!r}: its name becomes the run's; use letters, digits, '.', '_' or '-' "
                   "(at most 100), starting with a letter or digit")  # fmt: skip
        return Subject(name, folder, None, problem)
    try:
        own = _own_settings(folder / SETTINGS_FILE)
        settings = {**own, "data.instance_dir": str(folder.resolve()), "run.name": name}
        return Subject(name, folder, _settling(load_config(config, overrides, artifacts, settings)))
    except ConfigError as err:
        return Subject(name, folder, None, str(err))


def _settling(config: RunConfig) -> RunConfig:
    """A night leaves photos modified in its last minutes for the next night, unless a setting says otherwise."""
    if config.data.settle_minutes is not None:
        return config
    return config.model_copy(update={"data": config.data.model_copy(update={"settle_minutes": NIGHT_SETTLE_MINUTES})})


def _own_settings(file: Path) -> dict[str, object]:
    """A subject's `subject.toml` as dotted settings; it may set anything a `--set` could but its folder and name."""
    if not file.is_file():
        return {}
    try:
        settings = flatten(tomllib.loads(file.read_text(encoding="utf-8")))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{file}: not valid TOML: {err}") from None
    for name in FIXED:
        if name in settings:
            raise ConfigError(f"{file}: {name} is set by the subjects folder (the subject's folder, its name and the "
                              "night's artifact root); remove it")  # fmt: skip
    return settings
