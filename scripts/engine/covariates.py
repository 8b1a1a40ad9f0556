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
from monai.engines.utils import PrepareBatchExtraInput, default_prepare_batch

from scripts.engine.sampling import preprocessing_sidecar

__all__ = [
    "KINDS",
    "CovariateEncoder",
    "read_covariates_csv",
    "fit_covariates",
    "covariates_in_sidecar",
    "num_covariate_features",
    "ConditionedGenerator",
    "ConditionSweep",
    "condition_labels",
    "with_condition",
    "condition_values",
    "require_unconditional",
    "with_covariates",
    "training_csv",
    "covariate_features_of",
    "prepare_batch",
    "CovariateChange",
    "counterfactual_changes",
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


class ConditionSweep(torch.nn.Module):
    """A conditional generator at several conditions: ``select(l)`` is the :class:`ConditionedGenerator` of condition
    l (``features`` (L, K), ``conditions`` their column values); ``labels`` name them in file names, e.g.
    ``brain_volume_ml1700``. Every other attribute is the generator's."""

    def __init__(self, generator: torch.nn.Module, features: torch.Tensor, conditions: Sequence[Mapping]) -> None:
        super().__init__()
        self.generator = generator
        self.conditions = [dict(c) for c in conditions]
        self.register_buffer("features", features.float())
        varying = [k for k in self.conditions[0] if len({str(c[k]) for c in self.conditions}) > 1]
        self.labels = [
            "_".join(f"{k}{c[k]:g}" if isinstance(c[k], float) else f"{k}{c[k]}" for k in varying)
            for c in self.conditions
        ]

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("generator"), name)

    def select(self, index: int) -> ConditionedGenerator:
        return ConditionedGenerator(self.generator, self.features[index], self.conditions[index])

    def sample(self, n: int, temperature: float = 1.0) -> torch.Tensor:
        raise ValueError(f"{len(self.conditions)} conditions: sample each with select(l) (labels {self.labels})")


def with_condition(generator: torch.nn.Module, model_path: str, condition: Mapping[str, object] | None):
    """``generator`` sampling at ``condition`` (inference.json's option) when the model at ``model_path`` is
    conditional: a :class:`ConditionedGenerator`, or a :class:`ConditionSweep` when ``condition`` gives lists of
    values (one condition per element; lists of one condition have the same length, single values are used in each).
    A condition for an unconditional model stops with an error."""
    encoder = covariates_in_sidecar(model_path)
    if encoder is None:
        if condition:
            raise ValueError(f"condition {dict(condition)} given, but the model at {model_path} has no covariates")
        return generator
    condition = dict(condition or {})
    if not any(isinstance(v, (list, tuple)) for v in condition.values()):
        values = condition_values(encoder, condition)
        return ConditionedGenerator(generator, encoder.encode(values, "condition"), values)
    settings = _expand_lists(condition, "condition")
    if not settings:
        raise ValueError(f"condition: the lists of values must have one and the same length, got {condition}")
    conditions = [condition_values(encoder, c) for c in settings]
    features = torch.stack([encoder.encode(c, f"condition {i}") for i, c in enumerate(conditions)])
    return ConditionSweep(generator, features, conditions)


def condition_labels(network: torch.nn.Module) -> list[str]:
    """The labels of a :class:`ConditionSweep`'s conditions; [] for a generator with one condition or none."""
    return list(network.labels) if isinstance(network, ConditionSweep) else []


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


def training_csv(model_path: str) -> str | None:
    """The covariates CSV the model at ``model_path`` was trained with (recorded in its sidecar), when it still
    exists; None otherwise."""
    with open(preprocessing_sidecar(model_path)) as f:
        path = (json.load(f).get("covariates") or {}).get("csv")
    return path if path and os.path.isfile(path) else None


def covariate_features_of(files: Sequence[str], model_path: str, csv_path: str | None) -> dict | None:
    """{file: (K,) features} of ``files`` for the conditional model at ``model_path`` (see :func:`with_covariates`),
    None for an unconditional model."""
    if covariates_in_sidecar(model_path) is None:
        return None
    return {
        item["image"]: item["covariates"]
        for item in with_covariates([{"image": f} for f in files], model_path, csv_path)
    }


def with_covariates(items: Sequence[Mapping], model_path: str, csv_path: str | None, key: str = "image") -> list:
    """``items`` ({key: volume path, ...}) with ``"covariates"`` (K,): each volume's row of ``csv_path`` (None: the
    training CSV, :func:`training_csv`) encoded as the model at ``model_path`` was trained (its sidecar's encoding,
    no refit). For an unconditional model the items are returned as they are. Stops, naming the CSV, line and column, on a missing CSV, row or value."""
    encoder = covariates_in_sidecar(model_path)
    if encoder is None:
        return [dict(item) for item in items]
    csv_path = csv_path or training_csv(model_path)
    if not csv_path:
        raise ValueError(
            f"{model_path} is conditioned on {encoder.names}: give each volume's covariates with --covariates_csv "
            "(a CSV with a 'file' column and those columns, e.g. the one the model was trained with)"
        )
    rows = read_covariates_csv(csv_path)
    out = []
    for item in items:
        name = os.path.basename(str(item[key]))
        if name not in rows:
            raise ValueError(f"{csv_path}: no row for {name!r} (every volume needs a row whose 'file' is its name)")
        row = rows[name]
        out.append({**item, "covariates": encoder.encode(row, f"{csv_path}, line {row['_line']}")})
    return out


def prepare_batch(model_path: str):
    """The evaluator's ``prepare_batch``: passes the batch's ``covariates`` to the inferer (as the keyword
    ``covariates``) for a conditional model, nothing extra for an unconditional one."""
    if covariates_in_sidecar(model_path) is None:
        return default_prepare_batch
    return PrepareBatchExtraInput({"covariates": "covariates"})


class CovariateChange:
    """One counterfactual change of covariate features (B, K) -> (B, K): per numeric covariate a change of its value
    (in its own units: ``{'brain_volume_ml': 100}`` adds 100 mL to each volume's own value), per categorical one
    the new category. ``label`` names it in file names, e.g. ``brain_volume_ml+100``."""

    def __init__(self, encoder: CovariateEncoder, change: Mapping[str, object]) -> None:
        unknown = sorted(set(change) - set(encoder.names))
        if unknown or not change:
            raise ValueError(f"counterfactual names {unknown or 'no covariate'}; the model has {encoder.names}")
        self.encoder, self.change = encoder, dict(change)
        offset, parts = 0, []
        self.shift = torch.zeros(encoder.num_features)
        self.categorical: dict[int, tuple[int, int]] = {}  # feature offset -> (one-hot width, chosen index)
        for c in encoder.columns:
            width = 1 if c["kind"] == "numeric" else len(c["categories"])
            if c["name"] in change:
                value = change[c["name"]]
                if c["kind"] == "numeric":
                    delta = _number(str(value), f"counterfactual {c['name']!r}")
                    self.shift[offset] = delta / c["std"]
                    parts.append(f"{c['name']}{delta:+g}")
                else:
                    if str(value) not in c["categories"]:
                        raise ValueError(
                            f"counterfactual {c['name']!r}: category {value!r} was not seen in training "
                            f"(categories: {c['categories']})"
                        )
                    self.categorical[offset] = (width, c["categories"].index(str(value)))
                    parts.append(f"{c['name']}={value}")
            offset += width
        self.label = "_".join(parts)

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        out = features + self.shift.to(features)
        for offset, (width, index) in self.categorical.items():
            out[:, offset : offset + width] = 0.0
            out[:, offset + index] = 1.0
        return out


def counterfactual_changes(model_path: str, counterfactual: Mapping[str, object] | None) -> list[CovariateChange]:
    """The changes of ``reconstruct.json``'s ``counterfactual`` option for the model at ``model_path``: a mapping
    covariate -> change, where a list gives one counterfactual per element (lists of one mapping must have the same
    length; a single value is used in each). None or {} gives none; a counterfactual of an unconditional model stops
    with an error."""
    if not counterfactual:
        return []
    encoder = covariates_in_sidecar(model_path)
    if encoder is None:
        raise ValueError(
            f"counterfactual {dict(counterfactual)} given, but the model at {model_path} has no covariates"
        )
    return [CovariateChange(encoder, c) for c in _expand_lists(counterfactual, "counterfactual")]


def _expand_lists(settings: Mapping[str, object], option: str) -> list[dict]:
    """One mapping per position of the lists among ``settings``' values (single values are used in each; no lists:
    ``[settings]``). Lists of different lengths stop with an error naming ``option``."""
    lengths = {len(v) for v in settings.values() if isinstance(v, (list, tuple))}
    if len(lengths) > 1:
        raise ValueError(f"{option}: the lists of values must have one and the same length, got {dict(settings)}")
    count = lengths.pop() if lengths else 1
    return [{k: v[i] if isinstance(v, (list, tuple)) else v for k, v in settings.items()} for i in range(count)]
