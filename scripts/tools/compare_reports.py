# Copyright 2026 The VDVAE bundle authors. Licensed under the Apache License, Version 2.0.
"""Side-by-side table of ``evaluate.json`` reports (VDVAE and the VQ family), as Markdown.

    python -m scripts.tools.compare_reports --reports "{'VDVAE': 'eval/vdvae/report.json', 'VQ-VAE + absorbing': 'eval/vq_absorbing/report.json'}" \\
        --temperatures "{'VDVAE': 0.8}" --output docs/comparison.md

Each row is one report at one sampling temperature (every temperature of the report, or those ``temperatures``
names per model). Every figure is read from the reports; nothing is computed here but the formatting.
"""

from __future__ import annotations

import json
import os

import fire

__all__ = ["comparison_rows", "markdown_table", "main"]

COLUMNS = [
    "model",
    "held-out likelihood",
    "PSNR (dB)",
    "SSIM",
    "MS-SSIM samples (real)",
    "Frechet distance samples (held-out)",
    "MMD² samples (held-out)",
    "nearest-train RMSE samples (held-out), median",
    "s / sample",
]


def _likelihood(report: dict) -> str:
    like = report["likelihood"]
    if "neg_elbo_bits_per_voxel" in like:
        return f"{like['neg_elbo_nats_per_voxel']['mean']:.3f} nats/voxel (neg. ELBO)"
    kind = "exact NLL" if like["kind"].startswith("exact") else "ELBO"
    return f"{like['bits_per_token']['mean']:.3f} bits/token ({kind}, {like['tokens_per_volume']} tokens)"


def comparison_rows(reports: dict[str, dict], temperatures: dict | None = None) -> list[list[str]]:
    """Rows of formatted figures: per (name, report), one per sampling temperature of the report, or of
    ``temperatures[name]`` (a number or a list) when given."""
    rows = []
    for name, report in reports.items():
        samples = report["samples"]
        wanted = (temperatures or {}).get(name)
        if wanted is None:
            keys = list(samples)
        else:
            keys = [f"{float(t):g}" for t in (wanted if isinstance(wanted, (list, tuple)) else [wanted])]
        for key in keys:
            if key not in samples:
                raise KeyError(f"the report of {name!r} has no samples at temperature {key} (has {sorted(samples)})")
            rows.append(_row(name, key, report))
    return rows


def _row(name: str, key: str, report: dict) -> list[str]:
    s, real, rec = report["samples"][key], report["real"], report["reconstruction"]
    div = s["diversity_mean_pairwise_ms_ssim"]
    return [
        f"{name} (T={key})",
        _likelihood(report),
        f"{rec['psnr_db']:.1f}",
        f"{rec['ssim']:.3f}",
        f"{div:.3f} ({real['diversity_mean_pairwise_ms_ssim']:.3f})" if div is not None else "n/a",
        f"{s['frechet_distance_to_train']:.0f} ({real['frechet_distance_to_train']:.0f})",
        f"{s['mmd_to_train']:.3f} ({real['mmd_to_train']:.3f})",
        f"{s['nearest_train_rmse']['median']:.3f} ({real['nearest_train_rmse']['median']:.3f})",
        f"{s['seconds_per_sample']:.3f}",
    ]


def markdown_table(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def main(reports: dict, temperatures: dict | None = None, output: str | None = None) -> None:
    """Prints (and with ``output`` writes) the table of ``reports`` ({name: path of report.json})."""
    loaded = {}
    for name, path in reports.items():
        if not os.path.isfile(path):
            raise FileNotFoundError(f"report of {name!r} not found at {path}: run evaluate.json first")
        with open(path) as f:
            loaded[name] = json.load(f)
    table = markdown_table(comparison_rows(loaded, temperatures))
    if output:
        with open(output, "w") as f:
            f.write(table)
    print(table)


if __name__ == "__main__":
    fire.Fire(main)
