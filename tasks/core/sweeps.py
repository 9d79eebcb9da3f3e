"""A sweep file: a base config, settings every cell shares, and a matrix (and/or a list of runs) over config keys,
resolved into cells, each a whole RunConfig validated before anything runs.

    name = "toy"
    config = "toy"                              # every cell's config file, or a shipped preset by name
    [set]                                       # settings every cell shares
    "train.steps" = 200
    [matrix]                                    # one cell per combination; `config` may be an axis too
    "data.instance_dir" = ["data/toy_sets/close_up", "data/toy"]
    "train.train_text_encoder" = [true, false]
    [[runs]]                                    # and/or cells named one by one
    name = "low-lr"
    "train.learning_rate" = 1e-6
"""

from __future__ import annotations

import itertools
import math
import tomllib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tasks.core.config import ConfigError, RunConfig
from tasks.core.config_load import load_config, parse_override, shipped_or_file
from tasks.core.shipped import shipped_root, shipped_sweeps

CONFIG_AXIS = "config"  # the one key that is not a setting: the config file a cell starts from
PER_CELL = ("run.name", "run.artifacts_root")  # the sweep names each cell; all cells share one artifact root
MAX_CELLS = 256
FOLDERS = ("data.instance_dir",)  # a sweep file's relative folders lie in its `root`, or beside a shipped sweep
ROOT = "root"  # the one `--set` name that is the sweep's own, not a run setting


class Cell(BaseModel):
    """One run of a sweep: its name, the values it sets beyond the shared ones, and its whole config."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    values: dict[str, Any]
    config: RunConfig


class Sweep(BaseModel):
    """A resolved sweep: its name, the config every cell starts from (shared settings applied), and the cells."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    base: RunConfig
    cells: list[Cell]
    reference: dict[str, dict[str, float]] = {}


class SweepFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$", description="Sweep name: its report's folder")
    config: str = Field("", description="Every cell's config file or shipped preset; empty: the defaults")
    shared: dict[str, Any] = Field(default_factory=dict, alias="set", description="Settings every cell shares")
    matrix: dict[str, Any] = Field(default_factory=dict, description="Setting -> values; a cell per combination")
    runs: list[dict[str, Any]] = Field(default_factory=list, description="Cells named one by one")
    root: str = Field(
        "", description="Folder the file's relative instance folders lie in; empty: a shipped sweep's data, else cwd"
    )
    reference: dict[str, dict[str, float]] = Field(
        default_factory=dict, description="Published figures shown beside the cells' means: name -> metric -> value"
    )


def flatten(table: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"train": {"steps": 40}}` and `{"train.steps": 40}` alike -> `{"train.steps": 40}`."""
    flat: dict[str, Any] = {}
    for key, value in table.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _read(file: Path) -> SweepFile:
    try:
        return SweepFile.model_validate(tomllib.loads(file.read_text()))
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"sweep file {str(file)!r} is not valid TOML: {err}") from None
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "top level"
        allowed = "name, config, set, matrix, runs"
        hint = f"; allowed at the top level: {allowed}" if first["type"] == "extra_forbidden" else ""
        raise ConfigError(f"sweep file {str(file)!r}: {where}: {first['msg']}{hint}") from None


def _check_axes(axes: dict[str, Any], where: str) -> None:
    for name, values in axes.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}: matrix {name!r} must be a non-empty list of values, e.g. [1, 2]")
        if len({repr(v) for v in values}) < len(values):
            raise ConfigError(f"{where}: matrix {name!r} lists a value twice")


def _short(name: str, value: Any) -> str:
    """A value as a cell name shows it: a config or folder by its last part, booleans in lower case."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "+".join(_short(name, v) for v in value)
    if name == CONFIG_AXIS:
        return Path(str(value)).stem
    if isinstance(value, str) and "/" in value:
        return Path(value).name
    return str(value)


def cell_name(values: dict[str, Any]) -> str:
    """`instance_dir=close_up,train_text_encoder=false`: each setting by its last part, unless two share it."""
    leaves = [name.rsplit(".", 1)[-1] for name in values]
    parts = []
    for (name, value), leaf in zip(values.items(), leaves, strict=True):
        parts.append(f"{leaf if leaves.count(leaf) == 1 else name}={_short(name, value)}")
    return ",".join(parts) or "base"


def _check_names(values: dict[str, Any], where: str) -> None:
    for name in values:
        if name in PER_CELL:
            raise ConfigError(f"{where}: {name} cannot vary: the sweep names each cell, and all share one artifact "
                              "root (set it with --artifacts)")  # fmt: skip


def _placed(values: dict[str, Any], folder: Path) -> dict[str, Any]:
    """The folder settings among `values`, relative ones moved into `folder`."""

    def place(value: Any) -> Any:
        local = isinstance(value, str) and "://" not in value  # a URL is where it says
        return str(folder / value) if local and not Path(value).is_absolute() else value

    return {n: ([place(v) for v in x] if isinstance(x, list) else place(x)) if n in FOLDERS else x
            for n, x in values.items()}  # fmt: skip


def load_sweep(path: Path, overrides: list[str] = (), artifacts: Path | None = None) -> Sweep:
    """Read a sweep file (or a shipped one by name), apply `--set` (on a matrix key it replaces the axis's values,
    elsewhere it is a setting every cell shares), and resolve every cell's config, all before any cell runs."""
    file, shipped = shipped_or_file(path, shipped_sweeps(), "sweep")
    where = f"sweep {str(file)!r}"
    spec = _read(file)
    shared, axes, runs = flatten(spec.shared), flatten(spec.matrix), [flatten(run) for run in spec.runs]
    given = {".".join(keys): value for keys, value in map(parse_override, overrides)}
    root = str(given.pop(ROOT, spec.root))
    folder = Path(root).expanduser().resolve() if root else shipped_root() if shipped else None
    if folder is not None:  # the file's folders; folders given with --set stay relative to the working directory
        shared, axes, runs = _placed(shared, folder), _placed(axes, folder), [_placed(r, folder) for r in runs]
    for name, value in given.items():
        (axes if name in axes else shared)[name] = value
    _check_axes(axes, where)
    for values in (shared, axes, *runs):
        _check_names(values, where)
    count = (math.prod(len(v) for v in axes.values()) if axes else 0) + len(runs)
    if count == 0:
        raise ConfigError(f"{where}: no cells; add a [matrix] of settings or [[runs]]")
    if count > MAX_CELLS:
        raise ConfigError(f"{where}: {count} cells; a sweep runs at most {MAX_CELLS}: shorten the matrix")
    wanted = [dict(zip(axes, combo, strict=True)) for combo in itertools.product(*axes.values())] if axes else []
    named = [(cell_name(values), values) for values in wanted]
    for index, run in enumerate(runs, start=1):
        name = str(run.pop("name", "") or f"run-{index}")
        named.append((name, run))
    base_config = shared.pop(CONFIG_AXIS, spec.config)
    base = _config(where, "shared settings", base_config, shared, artifacts, spec.name)
    cells = [_cell(where, spec.name, name, values, base_config, shared, artifacts) for name, values in named]
    _no_twins(where, cells)
    return Sweep(name=spec.name, base=base, cells=cells, reference=spec.reference)


def _config(where: str, what: str, config: str, settings: dict[str, Any], artifacts: Path | None,
            run_name: str) -> RunConfig:  # fmt: skip
    if not isinstance(config, str):
        raise ConfigError(f"{where}, {what}: config = {config!r}: expected a config file or preset name, e.g. 'sd15'")
    try:
        return load_config(Path(config) if config else None, [], artifacts, {**settings, "run.name": run_name})
    except ConfigError as err:
        raise ConfigError(f"{where}, {what}: {err}") from None


def _cell(where: str, sweep: str, name: str, values: dict[str, Any], base_config: str, shared: dict[str, Any],
          artifacts: Path | None) -> Cell:  # fmt: skip
    settings = {n: v for n, v in values.items() if n != CONFIG_AXIS}
    config = _config(where, f"cell {name!r}", values.get(CONFIG_AXIS, base_config), {**shared, **settings},
                     artifacts, f"{sweep} {name}")  # fmt: skip
    return Cell(name=name, values=values, config=config)


def _no_twins(where: str, cells: list[Cell]) -> None:
    """Two cells with one name, or with the same settings, would be one run twice: say which."""
    seen: dict[str, str] = {}
    names: set[str] = set()
    for cell in cells:
        if cell.name in names:
            raise ConfigError(f"{where}: two cells are named {cell.name!r}; name each run once")
        names.add(cell.name)
        settings = cell.config.model_dump(mode="json")
        settings["run"].pop("name")
        if (text := repr(settings)) in seen:
            raise ConfigError(f"{where}: cells {seen[text]!r} and {cell.name!r} are the same run; remove one")
        seen[text] = cell.name
