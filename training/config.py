"""Options of the training stages: a config file (YAML or JSON) plus command-line flags.

Every stage describes its options once, as a frozen dataclass whose defaults are the
documented defaults. The stage's ``add_arguments`` declares its flags with :func:`add_option`
(their argparse default is :data:`argparse.SUPPRESS`, so a flag that was not typed is absent
from the namespace) and :func:`add_config_argument` adds ``--config FILE``. Its ``main`` then
calls :func:`resolve_options`, which layers, lowest first:

1. the dataclass defaults,
2. the config file (the whole mapping, or its section named after the stage when the file
   holds a mapping under that key, so one file can configure every stage),
3. the flags given on the command line.

Unknown keys in a file are an error that lists the valid ones (a typo must not be silently
ignored); keys may use ``-`` or ``_``. The resolved options are recorded in each run's output
with :func:`options_to_dict`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from napari_langmamba.errors import ConfigError

logger = logging.getLogger(__name__)

T = TypeVar("T")

CONFIG_SUFFIXES = (".yaml", ".yml", ".json")


def add_config_argument(parser: argparse.ArgumentParser) -> None:
    """Add ``--config FILE`` (YAML or JSON; flags given on the command line override it)."""
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        metavar="FILE",
        help="YAML or JSON file of options (keys as the flags, '-' or '_'); a section named after "
        "the stage is used when present; flags given on the command line override the file",
    )


def add_option(parser: argparse.ArgumentParser | argparse._ArgumentGroup, *flags: str, **kwargs: Any) -> None:
    """``parser.add_argument`` whose value is absent from the namespace unless typed.

    ``default`` is not accepted: the default lives in the stage's options dataclass (pass it
    in ``help`` text if you like, e.g. ``"dose fraction (default 0.25)"``).
    """
    if "default" in kwargs:
        raise TypeError("add_option takes no default: the options dataclass holds it")
    parser.add_argument(*flags, default=argparse.SUPPRESS, **kwargs)


def load_config_file(path: str | os.PathLike, *, stage: str | None = None) -> dict[str, Any]:
    """Read a YAML or JSON config file into a dict (its ``stage`` section when it has one).

    Raises
    ------
    ConfigError
        The file is missing, unreadable, not YAML/JSON, or not a mapping.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"The config file {path} does not exist; check the path given to --config.")
    suffix = path.suffix.lower()
    if suffix not in CONFIG_SUFFIXES:
        raise ConfigError(
            f"A config file must be YAML (.yaml, .yml) or JSON (.json); got {path.name!r}."
        )
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"Could not read the config file {path}: {exc}") from exc
    if suffix == ".json":
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise ConfigError(f"The config file {path} is not valid JSON: {exc}") from exc
    else:
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"The config file {path} is not valid YAML: {exc}") from exc
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"The config file {path} must hold a mapping of option names to values; "
            f"found a {type(data).__name__}."
        )
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    if stage is not None and isinstance(data.get(stage), Mapping):
        data = {str(k).replace("-", "_"): v for k, v in data[stage].items()}
    return data


def option_fields(cls: type) -> tuple[str, ...]:
    """The option names of an options dataclass."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    return tuple(f.name for f in dataclasses.fields(cls))


def resolve_options(
    cls: type[T],
    args: argparse.Namespace | None = None,
    *,
    stage: str | None = None,
    config: str | os.PathLike | Mapping[str, Any] | None = None,
) -> T:
    """Build an options dataclass from defaults < config file < command-line flags.

    Parameters
    ----------
    cls
        The stage's options dataclass; its ``__post_init__`` validates and normalises values.
    args
        The parsed namespace (flags declared with :func:`add_option`; ``args.config`` is read
        when ``config`` is not given).
    stage
        The stage name, to pick the file's section of that name.
    config
        A file path or an already-loaded mapping, instead of ``args.config``.

    Raises
    ------
    ConfigError
        Unknown keys in the file, or values the dataclass rejects.
    """
    names = option_fields(cls)
    values: dict[str, Any] = {}
    if config is None and args is not None:
        config = getattr(args, "config", None)
    if config is not None:
        file_values = (
            {str(k).replace("-", "_"): v for k, v in config.items()}
            if isinstance(config, Mapping)
            else load_config_file(config, stage=stage)
        )
        unknown = sorted(set(file_values) - set(names))
        if unknown:
            where = "the config mapping" if isinstance(config, Mapping) else f"the config file {config}"
            raise ConfigError(
                f"Unknown option(s) {', '.join(unknown)} in {where}"
                f"{f' for stage {stage!r}' if stage else ''}; valid options are: {', '.join(names)}."
            )
        values.update(file_values)
    if args is not None:
        values.update({k: v for k, v in vars(args).items() if k in names})
    try:
        return cls(**values)
    except TypeError as exc:
        raise ConfigError(f"Invalid options for {stage or cls.__name__}: {exc}") from exc


def to_jsonable(value: Any) -> Any:
    """Paths to strings, tuples to lists, dataclasses to dicts (recursively)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


def options_to_dict(options: Any) -> dict[str, Any]:
    """A JSON-serialisable dict of an options dataclass (to record with a run's output)."""
    if not dataclasses.is_dataclass(options) or isinstance(options, type):
        raise TypeError(f"{options!r} is not a dataclass instance")
    return to_jsonable(options)
