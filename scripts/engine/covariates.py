# Copyright 2026 The VDVAE bundle authors. Licensed under the Apache License, Version 2.0.
"""Covariates of the volumes (age, sex, brain volume, ...) read from a CSV, checked, and encoded as one feature
vector per volume for conditional models.

The CSV has a header, one row per volume and a column naming the volume's file (by default ``file``; a base name
such as ``subject_0001.nii.gz`` or a path whose base name is that). Which columns condition the model, and how, is
the ``covariates`` option: a mapping column -> "numeric" or "categorical" (None: every other column, numeric).
Numeric columns are standardised with the training volumes' mean and standard deviation; categorical ones become
one-hot vectors over the categories seen in training. The fitted encoding (:meth:`CovariateEncoder.state_dict`) is
saved beside the weights (the ``models/model.json`` sidecar), so sampling needs no CSV.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Mapping, Sequence

import torch

from scripts.engine.sampling import preprocessing_sidecar

__all__ = [
    "KINDS",
    "CovariateEncoder",
    "read_covariates_csv",
    "fit_covariates",
    "covariates_in_sidecar",
    "num_covariate_features",
    "ConditionedGenerator",
    "with_condition",
    "condition_values",
    "require_unconditional",
]

KINDS = ("numeric", "categorical")


def read_covariates_csv(path: str, file_column: str = "file") -> dict[str, dict[str, str]]:
    """{file base name: {column: text}} of every row of the CSV ``path``. Stops, naming the file, on a missing file
    column, an empty name and a file named twice."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"covariates_csv {path!r} does not exist")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or file_column not in reader.fieldnames:
            raise ValueError(
                f"{path}: no column {file_column!r} naming the volumes' files (columns: {reader.fieldnames})"
            )
        rows: dict[str, dict[str, str]] = {}
        for line, row in enumerate(reader, start=2):
            name = os.path.basename((row.get(file_column) or "").strip())
            if not name:
                raise ValueError(f"{path}, line {line}: empty {file_column!r}")
            if name in rows:
                raise ValueError(f"{path}, line {line}: {name!r} has a row already (line {rows[name]['_line']})")
            rows[name] = {**{k: (v or "").strip() for k, v in row.items() if k is not None}, "_line": str(line)}
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def _number(text: str, where: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{where}: {text!r} is not a number (a numeric covariate)") from None
    if not math.isfinite(value):
        raise ValueError(f"{where}: {text!r} is not a finite number (a numeric covariate)")
    return value


class CovariateEncoder:
    """Encodes covariate values as a feature vector (K,): numeric columns standardised, categorical ones one-hot.

    Args:
        columns: per covariate, in feature order: {"name", "kind": "numeric", "mean", "std"} or
            {"name", "kind": "categorical", "categories": [...]}.
    """

    def __init__(self, columns: Sequence[Mapping]) -> None:
        if not columns:
            raise ValueError("a covariate encoder needs at least one column")
        self.columns = [dict(c) for c in columns]
        for c in self.columns:
            if c.get("kind") not in KINDS:
                raise ValueError(f"covariate {c.get('name')!r}: kind must be one of {KINDS}, got {c.get('kind')!r}")

    @property
    def names(self) -> list[str]:
        return [c["name"] for c in self.columns]

    @property
    def num_features(self) -> int:
        return sum(1 if c["kind"] == "numeric" else len(c["categories"]) for c in self.columns)

    def encode(self, values: Mapping[str, object], where: str = "covariates") -> torch.Tensor:
        """(K,) float32 features of one volume's ``values`` (column -> value or its text). A missing column, a
        non-number in a numeric column and a category unseen in training stop with an error naming ``where``."""
        out: list[float] = []
        for c in self.columns:
            name = c["name"]
            if name not in values or values[name] in ("", None):
                raise ValueError(f"{where}: no value for the covariate {name!r}")
            value = values[name]
            if c["kind"] == "numeric":
                number = value if isinstance(value, (int, float)) else _number(str(value), f"{where}, column {name!r}")
                out.append((float(number) - c["mean"]) / c["std"])
            else:
                text = str(value)
                if text not in c["categories"]:
                    raise ValueError(
                        f"{where}, column {name!r}: category {text!r} was not seen in training "
                        f"(categories: {c['categories']})"
                    )
                out.extend(1.0 if text == k else 0.0 for k in c["categories"])
        return torch.tensor(out, dtype=torch.float32)

    def numeric_feature(self, name: str) -> tuple[int, dict]:
        """(index of its feature, its column) of the numeric covariate ``name``."""
        i = 0
        for c in self.columns:
            if c["name"] == name:
                if c["kind"] != "numeric":
                    raise ValueError(f"covariate {name!r} is categorical")
                return i, c
            i += 1 if c["kind"] == "numeric" else len(c["categories"])
        raise KeyError(f"no covariate {name!r} (covariates: {self.names})")

    def decode_numeric(self, features: torch.Tensor, name: str) -> torch.Tensor:
        """The values of the numeric covariate ``name`` from features (..., K) (the inverse of the standardisation)."""
        i, c = self.numeric_feature(name)
        return features[..., i] * c["std"] + c["mean"]

    def state_dict(self) -> dict:
        return {"columns": [dict(c) for c in self.columns]}

    @classmethod
    def from_state(cls, state: Mapping) -> CovariateEncoder:
        return cls(state["columns"])


def fit_covariates(
    csv_path: str,
    train_files: Sequence[str],
    other_files: Sequence[str] = (),
    columns: Mapping[str, str] | None = None,
    file_column: str = "file",
    folder_files: Sequence[str] | None = None,
) -> tuple[CovariateEncoder, dict[str, torch.Tensor]]:
    """The encoder fitted to the rows of ``train_files`` and the features {file path: (K,)} of every file in
    ``train_files`` and ``other_files`` (validation). Stops, naming the CSV and what is wrong, when a file has no row,
    a row names a file that is not in the data, a column is missing, a numeric cell is no number, a category of
    ``other_files`` was never seen in training, or a numeric column is constant over the training files. A row may
    name a file of ``folder_files`` (the whole data folder, default the files given) that the run does not use."""
    rows = read_covariates_csv(csv_path, file_column)
    files = list(train_files) + list(other_files)
    by_name = {os.path.basename(f): f for f in files}
    missing = [f for f in files if os.path.basename(f) not in rows]
    if missing:
        raise ValueError(
            f"{csv_path}: no row for {len(missing)} of the {len(files)} volumes, e.g. {missing[:3]}: "
            f"every volume needs a row whose {file_column!r} is its file name"
        )
    unknown = sorted(set(rows) - set(by_name) - {os.path.basename(f) for f in folder_files or ()})
    if unknown:
        examples = ", ".join(f"line {rows[u]['_line']}: {u}" for u in unknown[:3])
        raise ValueError(
            f"{csv_path}: {len(unknown)} rows name files that are not in the data set ({examples}): remove them or "
            "fix the names"
        )
    header = [k for k in next(iter(rows.values())) if k not in (file_column, "_line")]
    if columns is None:
        columns = {k: "numeric" for k in header}
    if not columns:
        raise ValueError(f"{csv_path}: no covariate columns besides {file_column!r}")
    train_rows = [rows[os.path.basename(f)] for f in train_files]
    spec = []
    for name, kind in columns.items():
        if name not in header:
            raise ValueError(f"{csv_path}: no column {name!r} (covariates option); columns: {header}")
        if kind not in KINDS:
            raise ValueError(f"covariates option: {name!r} must be 'numeric' or 'categorical', got {kind!r}")
        if kind == "numeric":
            values = [_number(r[name], f"{csv_path}, line {r['_line']}, column {name!r}") for r in train_rows]
            t = torch.tensor(values, dtype=torch.float64)
            std = float(t.std()) if len(t) > 1 else 0.0
            if not std > 0:
                raise ValueError(f"{csv_path}: covariate {name!r} is constant over the training volumes")
            spec.append({"name": name, "kind": "numeric", "mean": float(t.mean()), "std": std})
        else:
            categories = sorted({r[name] for r in train_rows if r[name] != ""})
            spec.append({"name": name, "kind": "categorical", "categories": categories})
    encoder = CovariateEncoder(spec)  # encoding every file also checks the validation files' cells
    features = {}
    for f in files:
        row = rows[os.path.basename(f)]
        features[f] = encoder.encode(row, f"{csv_path}, line {row['_line']}")
    return encoder, features


def covariates_in_sidecar(model_path: str) -> CovariateEncoder | None:
    """The covariate encoding saved beside ``model_path`` (its ``.json`` sidecar), or None for an unconditional
    model (or weights without a sidecar)."""
    sidecar = preprocessing_sidecar(model_path)
    if not os.path.isfile(sidecar):
        return None
    with open(sidecar) as f:
        state = json.load(f).get("covariates")
    return CovariateEncoder.from_state(state) if state else None


def num_covariate_features(model_path: str) -> int:
    """K of the model at ``model_path`` (0 when it is unconditional): what its ``network_def`` needs."""
    encoder = covariates_in_sidecar(model_path)
    return 0 if encoder is None else encoder.num_features


class ConditionedGenerator(torch.nn.Module):
    """A conditional generator whose ``sample(n, T)`` draws at fixed covariate ``features`` (K,), expanded to the
    batch. Every other attribute is the generator's. :func:`with_condition` makes one from column values."""

    def __init__(self, generator: torch.nn.Module, features: torch.Tensor, condition: Mapping | None = None) -> None:
        super().__init__()
        self.generator = generator
        self.condition = dict(condition or {})
        self.register_buffer("features", features.float().reshape(-1))

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("generator"), name)

    def forward(self, *args, **kwargs):
        return self.generator(*args, **kwargs)

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 1.0) -> torch.Tensor:
        return self.generator.sample(n, temperature, covariates=self.features.expand(n, -1))


def with_condition(generator: torch.nn.Module, model_path: str, condition: Mapping[str, object] | None):
    """``generator`` sampling at ``condition`` (inference.json's option) when the model at ``model_path`` is
    conditional; a condition for an unconditional model stops with an error."""
    encoder = covariates_in_sidecar(model_path)
    if encoder is None:
        if condition:
            raise ValueError(f"condition {dict(condition)} given, but the model at {model_path} has no covariates")
        return generator
    values = condition_values(encoder, condition or {})
    return ConditionedGenerator(generator, encoder.encode(values, "condition"), values)


def condition_values(encoder: CovariateEncoder, condition: Mapping[str, object]) -> dict:
    """``condition`` completed for ``encoder``: numeric covariates left out take the training mean (feature 0);
    categorical ones must be given. A name the model does not have stops with an error."""
    unknown = sorted(set(condition) - set(encoder.names))
    if unknown:
        raise ValueError(f"condition names {unknown}, but the model is conditioned on {encoder.names}")
    values = dict(condition)
    for c in encoder.columns:
        if c["name"] not in values and c["kind"] == "numeric":
            values[c["name"]] = c["mean"]
    return {k: values[k] for k in encoder.names if k in values}


def require_unconditional(model_path: str, config: str) -> int:
    """0, the ``num_covariates`` of ``config``'s network; stops with a clear error for a conditional model, whose
    volumes' covariates ``config`` does not read yet (inference.json samples conditional models)."""
    encoder = covariates_in_sidecar(model_path)
    if encoder is not None:
        raise NotImplementedError(
            f"{model_path} is conditioned on {encoder.names}; {config} does not read each volume's covariates yet: "
            "sample it with configs/inference.json --condition \"{'name': value}\""
        )
    return 0
