# Copyright 2026 The VDVAE bundle authors. Licensed under the Apache License, Version 2.0.
"""Start-up validation of the bundle's top-level hyperparameters against ``configs/hyperparameters.schema.json``.

Called from a config's ``initialize`` list as ``$scripts.config.validate_hyperparameters(@hyperparameters_schema)``
(``configs/hyperparameters.schema.json`` for the VDVAE, ``configs/vq_hyperparameters.schema.json`` for the VQ family). MONAI
gives config expressions no handle on the parser, so the function finds the ConfigParser that is evaluating
it on the call stack, reads the merged top-level keys (config files + command-line overrides), resolves
those the schema types, and raises ValueError naming every unknown (misspelled) or ill-typed key.
"""

from __future__ import annotations

import difflib
import inspect
import json

import jsonschema
from monai.bundle import ConfigParser

__all__ = ["validate_hyperparameters", "check_hyperparameters"]


def _active_parser() -> ConfigParser | None:
    frame = inspect.currentframe()
    while frame is not None:
        obj = frame.f_locals.get("self")
        if isinstance(obj, ConfigParser):
            return obj
        frame = frame.f_back
    return None


def check_hyperparameters(values: dict, schema: dict) -> None:
    """Raises ValueError listing unknown keys (with a close match) and schema violations of ``values``."""
    known = set(schema["properties"])
    errors = []
    for key in sorted(set(values) - known):
        close = difflib.get_close_matches(key, sorted(known), n=1)
        errors.append(f"unknown option {key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    validator = jsonschema.Draft7Validator(schema)
    for err in sorted(validator.iter_errors({k: v for k, v in values.items() if k in known}), key=lambda e: list(e.path)):
        where = "/".join(str(p) for p in err.path) or "(top level)"
        hint = ""
        if err.validator == "type" and err.validator_value == "boolean" and isinstance(err.instance, str):
            hint = " (on the command line write True or False)"
        errors.append(f"option {where!r}: {err.message}{hint}")
    if errors:
        raise ValueError("invalid bundle options:\n  - " + "\n  - ".join(errors))


def validate_hyperparameters(schema_file: str, parser: ConfigParser | None = None) -> bool:
    """Validates the active config's top-level keys against the JSON schema ``schema_file``; returns True (so it can
    sit in an ``initialize`` list)."""
    parser = parser or _active_parser()
    if parser is None:
        raise RuntimeError("validate_hyperparameters must run inside a MONAI ConfigParser (a bundle config expression)")
    with open(schema_file) as f:
        schema = json.load(f)
    typed = {k for k, v in schema["properties"].items() if v.get("type") or v.get("enum")}
    values = {}
    for key in parser.config:
        values[key] = parser.get_parsed_content(key) if key in typed else None
    check_hyperparameters(values, schema)
    return True
