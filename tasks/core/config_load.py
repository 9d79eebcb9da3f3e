"""Reading a run config: a TOML file or a shipped preset, `--set` overrides and a sweep's settings, validated at
once; whatever is wrong comes back as one line that names the file or setting."""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from tasks.core.config import ConfigError, RunConfig
from tasks.core.shipped import shipped_configs, shipped_root
from tasks.core.values import folder_or_url


def parse_override(text: str) -> tuple[list[str], Any]:
    """`section.key=value`, the value read as a TOML value, else kept as a plain string."""
    name, sep, raw = text.partition("=")
    if not sep or not name.strip():
        raise ConfigError(f"--set {text!r}: expected section.key=value, e.g. preprocess.resolution=512")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return name.strip().split("."), value


def _apply(data: dict[str, Any], path: list[str], value: Any, where: str) -> None:
    """Set `section.key` in raw config data; `where` names the setting for an error (e.g. `--set 'x=1'`)."""
    node = data
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{where}: {part!r} is a value, not a section")
        node = child
    node[path[-1]] = value


def _describe(error: ValidationError, data: dict[str, Any]) -> str:
    first = error.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    if first["type"] == "extra_forbidden":
        section = first["loc"][:-1]
        model: type[BaseModel] = RunConfig
        for part in section:
            model = model.model_fields[str(part)].annotation  # type: ignore[assignment]
        allowed = ", ".join(model.model_fields)
        where = ".".join(str(p) for p in section) or "top level"
        return f"unknown setting {loc!r}; allowed in {where}: {allowed}"
    return f"{loc} = {first.get('input')!r}: {first['msg']}"


def shipped_or_file(path: Path, presets: dict[str, Path], kind: str) -> tuple[Path, bool]:
    """The file an argument names and whether it is shipped: an existing file, else a preset's name (`toy`,
    `demo.toml`). `kind` names the files in the error, e.g. `config`."""
    if path.is_file():
        return path, False
    if len(path.parts) == 1 and path.name.removesuffix(".toml") in presets:
        return presets[path.name.removesuffix(".toml")], True
    problem = "is a folder, not a TOML file" if path.is_dir() else "not found"
    raise ConfigError(f"{kind} file {str(path)!r} {problem}; shipped {kind}s: {', '.join(presets)}")


def _read_config(path: Path) -> dict[str, Any]:
    """A config file's settings. A shipped preset's instance folder is relative to the shipped data (a user's file
    keeps its paths relative to the working directory), so `--config toy` works from any folder."""
    file, shipped = shipped_or_file(path, shipped_configs(), "config")
    try:
        data = tomllib.loads(file.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"config file {str(file)!r} is not valid TOML: {err}") from None
    if shipped and "instance_dir" in data.get("data", {}):
        data["data"]["instance_dir"] = str(shipped_root() / data["data"]["instance_dir"])
    return data


def load_config(
    path: Path | None,
    overrides: list[str] = (),
    artifacts: Path | None = None,
    settings: Mapping[str, Any] | None = None,
) -> RunConfig:
    """Read a TOML file or shipped preset, apply `--set` overrides, then `settings` (dotted name -> value, as a
    sweep gives them) and `--artifacts`, and validate it all at once."""
    data = _read_config(path) if path is not None else {}
    for text in overrides:
        keys, value = parse_override(text)
        _apply(data, keys, value, f"--set {text!r}")
    for name, value in (settings or {}).items():
        _apply(data, name.split("."), value, f"setting {name!r}")
    if artifacts is not None:
        _apply(data, ["run", "artifacts_root"], str(artifacts), "--artifacts")
    try:
        config = RunConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_describe(err, data)) from None
    return absolute_paths(config)


def absolute_paths(config: RunConfig) -> RunConfig:
    """Folders relative to the working directory, made absolute so every process of a run agrees (a URL stays)."""
    return config.model_copy(
        update={
            "run": config.run.model_copy(update={"artifacts_root": folder_or_url(config.run.artifacts_root)}),
            "data": config.data.model_copy(update={"instance_dir": folder_or_url(config.data.instance_dir)}),
        }
    )
