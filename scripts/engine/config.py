# Copyright 2026 The VDVAE bundle authors. Licensed under the Apache License, Version 2.0.
"""Config helpers: values taken from another config of the bundle, and start-up validation of the top-level
hyperparameters against ``configs/hyperparameters.schema.json``.

``from_config_file`` lets a config take a default that another config states (``inference.json`` takes the
architecture from ``train.json``) wherever the bundle lies: MONAI's ``"%configs/train.json#key"`` macros are read
relative to the working directory, this reads them under ``bundle_root``.

``validate_hyperparameters`` is called from a training config's ``initialize`` list as
``$scripts.engine.config.validate_hyperparameters(@hyperparameters_schema, 'vdvae')`` (``'vq'`` in the VQ family's). The one
schema, ``configs/hyperparameters.schema.json``, states the options both families share once (``properties``) and
each family's own under ``definitions/<family>``; ``config_components`` (shared and per family) lists the keys that
are config structure (networks, engines, ``initialize``...), not options. MONAI gives config expressions no handle on
the parser, so the function finds the ConfigParser that is evaluating it on the call stack, reads the merged top-level
keys (config files + command-line overrides), resolves those the schema types, and raises ValueError naming every
unknown (misspelled) or ill-typed key.
"""

from __future__ import annotations

import difflib
import inspect
import json
import os
import warnings
from typing import Any

import jsonschema
from monai.bundle import ConfigParser

__all__ = [
    "from_config_file",
    "sampling_defaults",
    "read_config_with_overrides",
    "family_schema",
    "validate_hyperparameters",
    "check_hyperparameters",
    "require_base",
]


def from_config_file(bundle_root: str, config_file: str, key: str, overrides: dict | None = None) -> Any:
    """The parsed value of ``key`` in the bundle's config ``config_file``, found under ``bundle_root``.

    What the macro ``"%<config_file>#<key>"`` gives, but read from ``bundle_root`` instead of the working
    directory, so that a config runs from anywhere given ``--bundle_root``. Used in a config as
    ``"channels": "$scripts.engine.config.from_config_file(@bundle_root, 'configs/train.json', 'channels')"``.

    Args:
        bundle_root: the bundle folder (the calling config's ``@bundle_root``).
        config_file: path of the other config relative to ``bundle_root``, e.g. ``"configs/train.json"``.
        key: its id to resolve (nested ids such as ``"slicing#validate"`` work).
        overrides: top-level ids set in ``config_file`` before ``key`` is resolved: the calling config's own values
            for what ``key`` refers to, e.g. ``{'resolution': @resolution}`` for transforms that read ``@resolution``,
            so that the caller's options and overlays apply. Everything else keeps ``config_file``'s value.

    Returns:
        the resolved value: a plain value, or the instantiated components (transforms, networks) of ``key``, with
        ``config_file``'s ``bundle_root`` set to ``bundle_root``.

    Raises:
        FileNotFoundError: ``config_file`` is not under ``bundle_root`` (the message says to pass ``--bundle_root``).
        KeyError: ``config_file`` has no ``key``.
    """
    path = os.path.join(bundle_root, config_file)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} not found: bundle_root {bundle_root!r} must be the bundle folder that holds {config_file} "
            f"(run from the bundle folder or pass --bundle_root <bundle folder>)"
        )
    parser = ConfigParser()
    with warnings.catch_warnings():  # an overlay read alone: its "+" keys are copied, which is what we want here
        warnings.filterwarnings("ignore", message="Can't merge entry")
        parser.read_config(path)
    if key not in parser:
        raise KeyError(f"{path} has no key {key!r}")
    parser.update({"bundle_root": bundle_root, **(overrides or {})})
    return parser.get_parsed_content(key)


def _active_parser() -> ConfigParser | None:
    frame = inspect.currentframe()
    while frame is not None:
        obj = frame.f_locals.get("self")
        if isinstance(obj, ConfigParser):
            return obj
        frame = frame.f_back
    return None


def read_config_with_overrides(config_file: str | list[str], overrides: dict) -> ConfigParser:
    """A parser of ``config_file`` (one file or a list: base first, overlays after) with ``overrides`` set, as
    ``monai.bundle run --config_file ... --key value`` would: what the tools that read a run's config start from."""
    parser = ConfigParser()
    parser.read_config(config_file)
    parser.update(overrides)
    return parser


def sampling_defaults(bundle_root: str, temperature=None, use_latent_prior=None) -> tuple:
    """(temperature, use_latent_prior): the values given, else ``inference.json``'s, the VDVAE's one default that
    every tool that samples follows."""
    if temperature is None:
        temperature = from_config_file(bundle_root, "configs/inference.json", "temperature")
    if use_latent_prior is None:
        use_latent_prior = from_config_file(bundle_root, "configs/inference.json", "use_latent_prior")
    return temperature, use_latent_prior


def family_schema(schema: dict, family: str) -> dict:
    """The JSON schema of one family's options: the shared ``properties`` and ``config_components`` of the bundle's
    schema joined with those under ``definitions/<family>``. Raises ValueError naming the known families."""
    families = schema.get("definitions", {})
    if family not in families:
        raise ValueError(f"unknown family {family!r} for the options schema; expected one of {sorted(families)}")
    own = families[family]
    return {
        "type": "object",
        "properties": {**schema["properties"], **own["properties"]},
        "config_components": [*schema.get("config_components", []), *own.get("config_components", [])],
    }


def check_hyperparameters(values: dict, schema: dict) -> None:
    """Raises ValueError listing unknown keys (with a close match) and schema violations of ``values``, given one
    family's schema (:func:`family_schema`): keys in its ``config_components`` are accepted unchecked."""
    components = set(schema.get("config_components", []))
    values = {k: v for k, v in values.items() if k not in components}
    known = set(schema["properties"])
    errors = []
    for key in sorted(set(values) - known):
        close = difflib.get_close_matches(key, sorted(known), n=1)
        errors.append(f"unknown option {key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    validator = jsonschema.Draft7Validator(schema)
    for err in sorted(
        validator.iter_errors({k: v for k, v in values.items() if k in known}), key=lambda e: list(e.path)
    ):
        where = "/".join(str(p) for p in err.path) or "(top level)"
        hint = ""
        if err.validator == "type" and err.validator_value == "boolean" and isinstance(err.instance, str):
            hint = " (on the command line write True or False)"
        errors.append(f"option {where!r}: {err.message}{hint}")
    if errors:
        raise ValueError("invalid bundle options:\n  - " + "\n  - ".join(errors))


def validate_hyperparameters(schema_file: str, family: str, parser: ConfigParser | None = None) -> bool:
    """Validates the active config's top-level keys against ``family``'s part (``"vdvae"`` or ``"vq"``) of the JSON
    schema ``schema_file``; returns True (so it can sit in an ``initialize`` list)."""
    parser = parser or _active_parser()
    if parser is None:
        raise RuntimeError("validate_hyperparameters must run inside a MONAI ConfigParser (a bundle config expression)")
    with open(schema_file) as f:
        schema = family_schema(json.load(f), family)
    typed = {k for k, v in schema["properties"].items() if v.get("type") or v.get("enum")}
    values = {}
    for key in parser.config:
        values[key] = parser.get_parsed_content(key) if key in typed else None
    check_hyperparameters(values, schema)
    return True


def require_base(
    overlay: str, bases: list[str | list[str]], needed: list[str], parser: ConfigParser | None = None
) -> bool:
    """Stops when the overlay config ``overlay`` runs without a base before it. ``bases``: the alternatives, each a
    config or a list of configs to put first. Called from the overlay's ``"+initialize"`` list (``+`` appends it to
    the base's list; alone it is the whole list, so it runs first), it looks for the top-level keys ``needed``, which
    only the bases define, in the merged configs; returns True when they are there. Without it an overlay run alone
    stops at the first reference to a missing key (``the referring item @seed is not defined``)."""
    parser = parser or _active_parser()
    if parser is None:
        return True
    missing = [k for k in needed if k not in parser.config]
    if missing:
        chains = [[b] if isinstance(b, str) else list(b) for b in bases]
        example = ",".join(f"'{f}'" for f in [*chains[0], overlay])
        raise ValueError(
            f"{overlay} is an overlay, not a whole config: put "
            + " or ".join(" and ".join(chain) for chain in chains)
            + f' before it, e.g. --config_file "[{example}]" (the configs being run define no {missing})'
        )
    return True
