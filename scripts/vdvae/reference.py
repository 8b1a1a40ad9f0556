# Copyright 2026 The VDVAE bundle authors. Licensed under the Apache License, Version 2.0.
"""Bring a checkpoint of the reference implementation (``3d_very_deep_vae``) over to this bundle's :class:`VDVAE`.

A reference checkpoint holds three state dicts, ``bottom_up_graph_1_state_dict`` (encoder),
``top_down_generative_graph_state_dict`` (decoder with priors and posteriors) and
``top_down_x_mu_graph_state_dict`` (output head), keys as the reference saves them (``module.`` prefixes from
DistributedDataParallel included). The reference numbers its modules per level:

- encoder ``{level}.{0,1}``: residual blocks (``convolutions.0-3``, ``skip_con``), ``{level}.2`` subsampling;
- decoder level g (1^3 first): ``0.{2j}`` latent group j and ``0.{2j+1}`` its residual block; below the top
  ``g.0`` is the upsampling, ``g.{2j+1}`` latent group j, ``g.{2j+2}`` its residual block. A latent group has
  ``convs_p.0-2`` (prior trunk), ``convs_p.3`` / ``.4`` (prior mean / raw scale), ``convs_p_skip_conv_after_prior``,
  ``convs_q.0-4`` (posterior), ``conv_z`` and, when it changes the width, ``skip_con_conv``;
- head ``0.convolutions.0``.

Command line (writes a plain state dict for ``network_def``)::

    python -m scripts.vdvae.reference --reference_checkpoint ref.pth --config_file configs/train.json [--output models/model.pt]
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

import torch

from scripts.vdvae.network import VDVAE, TopDownBlock

__all__ = [
    "REFERENCE_GRAPHS",
    "reference_key_map",
    "convert_reference_state_dict",
    "to_reference_state_dict",
    "convert",
    "REFERENCE_OPTIONS",
]

REFERENCE_GRAPHS = {
    "encoder": "bottom_up_graph_1_state_dict",
    "decoder": "top_down_generative_graph_state_dict",
    "head": "top_down_x_mu_graph_state_dict",
}


def _resblock_keys(ref: str, ours: str, has_skip: bool) -> list[tuple[str, str]]:
    pairs = [(f"{ref}.skip_con", f"{ours}.skip")] if has_skip else []
    pairs += [(f"{ref}.convolutions.{i}", f"{ours}.stack.convs.{i}") for i in range(3)]
    return pairs + [(f"{ref}.convolutions.3", f"{ours}.out")]


def reference_key_map(net: VDVAE) -> list[tuple[str, str, str]]:
    """(reference graph, reference module, this model's module) for every convolution of ``net``; each module has
    a ``weight`` and a ``bias``."""
    rows: list[tuple[str, str, str]] = []
    enc = REFERENCE_GRAPHS["encoder"]
    for level, blocks in enumerate(net.encoder_levels):
        for b, block in enumerate(blocks):
            has_skip = isinstance(block.skip, torch.nn.Conv3d)
            rows += [(enc, r, o) for r, o in _resblock_keys(f"{level}.{b}", f"encoder_levels.{level}.{b}", has_skip)]
    dec = REFERENCE_GRAPHS["decoder"]
    top = net.num_levels - 1
    index_in_level: dict[int, int] = {}
    for g, (block, res) in enumerate(zip(net.decoder_blocks, net.decoder_resblocks)):
        level = net.group_levels[g]
        j = index_in_level.get(level, 0)
        index_in_level[level] = j + 1
        ref_level = top - level
        first = 2 * j if ref_level == 0 else 2 * j + 1
        lat, ours = f"{ref_level}.{first}", f"decoder_blocks.{g}"
        pairs = []  # in the reference's order of registration
        if isinstance(block, TopDownBlock):
            if isinstance(block.skip, torch.nn.Conv3d):
                pairs.append((f"{lat}.skip_con_conv", f"{ours}.skip"))
            pairs += [(f"{lat}.convs_p.{i}", f"{ours}.prior.convs.{i}") for i in range(3)]
            pairs += [(f"{lat}.convs_p.3", f"{ours}.prior_mean"), (f"{lat}.convs_p.4", f"{ours}.prior_scale")]
            pairs.append((f"{lat}.convs_p_skip_conv_after_prior", f"{ours}.prior_skip"))
        pairs += [(f"{lat}.convs_q.{i}", f"{ours}.posterior.convs.{i}") for i in range(3)]
        pairs += [(f"{lat}.convs_q.3", f"{ours}.posterior_mean"), (f"{lat}.convs_q.4", f"{ours}.posterior_scale")]
        pairs.append((f"{lat}.conv_z", f"{ours}.z_proj"))
        pairs += _resblock_keys(
            f"{ref_level}.{first + 1}", f"decoder_resblocks.{g}", isinstance(res.skip, torch.nn.Conv3d)
        )
        rows += [(dec, r, o) for r, o in pairs]
    rows.append((REFERENCE_GRAPHS["head"], "0.convolutions.0", "output_head.conv"))
    return rows


def _strip_module(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {(k[len("module.") :] if k.startswith("module.") else k): v for k, v in state.items()}


def convert_reference_state_dict(
    checkpoint: Mapping, net: VDVAE, source: str = "the reference checkpoint"
) -> dict[str, torch.Tensor]:
    """A state dict for ``net`` from a reference checkpoint (a dict holding the three graphs' state dicts; other
    entries such as the optimiser are ignored). Raises ValueError naming the first missing, unexpected or
    mismatching tensor, with both shapes."""
    missing_graphs = [g for g in REFERENCE_GRAPHS.values() if g not in checkpoint]
    if missing_graphs:
        raise ValueError(
            f"{source} has no {missing_graphs} (expected the reference's keys {list(REFERENCE_GRAPHS.values())}); got {sorted(checkpoint)}"
        )
    graphs = {g: _strip_module(checkpoint[g]) for g in REFERENCE_GRAPHS.values()}
    ours = net.state_dict()
    out: dict[str, torch.Tensor] = {}
    used: dict[str, set[str]] = {g: set() for g in graphs}
    for graph, ref_module, our_module in reference_key_map(net):
        for param in ("weight", "bias"):
            ref_key, our_key = f"{ref_module}.{param}", f"{our_module}.{param}"
            if ref_key not in graphs[graph]:
                raise ValueError(
                    f"{source}: {graph} has no tensor 'module.{ref_key}' (needed for {our_key}, shape {list(ours[our_key].shape)}): "
                    "the checkpoint was trained with another architecture than the configured one"
                )
            tensor = graphs[graph][ref_key]
            if tuple(tensor.shape) != tuple(ours[our_key].shape):
                raise ValueError(
                    f"{source}: {graph} 'module.{ref_key}' has shape {list(tensor.shape)} but the configured model's {our_key} "
                    f"has shape {list(ours[our_key].shape)}: the checkpoint was trained with another architecture"
                )
            out[our_key] = tensor.detach().clone().to(ours[our_key].dtype)
            used[graph].add(ref_key)
    for graph, state in graphs.items():
        extra = sorted(set(state) - used[graph])
        if extra:
            raise ValueError(
                f"{source}: {graph} holds 'module.{extra[0]}' ({len(extra)} tensors in all) that the configured model has no "
                "place for: the checkpoint was trained with another architecture (more latent groups or levels)"
            )
    return out


def to_reference_state_dict(net: VDVAE) -> dict[str, dict[str, torch.Tensor]]:
    """The reference's three state dicts (keys with ``module.``) for ``net``'s weights: the inverse of
    :func:`convert_reference_state_dict`."""
    ours = net.state_dict()
    out: dict[str, dict[str, torch.Tensor]] = {g: {} for g in REFERENCE_GRAPHS.values()}
    for graph, ref_module, our_module in reference_key_map(net):
        for param in ("weight", "bias"):
            out[graph][f"module.{ref_module}.{param}"] = ours[f"{our_module}.{param}"].detach().clone()
    return out


REFERENCE_OPTIONS = {
    "full_resolution_residual": False,
    "shared_x_scale": False,
    "predict_x_scale": True,
    "output_activation_function": "tanh",
    "scale_hidden_clamp_bounds": [0.001, 1.0],
    "scale_output_clamp_bounds": [0.01, 1.0],
    "temperature_mode": "latent",
    "gradient_skip_factor": 0.0,
}
"""The config keys that make ``network_def`` (and fine-tuning's skip rule) compute the reference's function, with the
reference's values. The architecture lists and ``resolution`` are checked by the tensors' shapes instead."""


def _option(value) -> str:
    return f"'{json.dumps(value, separators=(',', ':'))}'" if isinstance(value, list) else str(value)


def convert(
    reference_checkpoint: str,
    config_file: str | list[str] = "configs/train.json",
    output: str | None = None,
    **override,
) -> str:
    """Reads ``reference_checkpoint``, builds ``network_def`` from ``config_file`` (a path or a list of overlays,
    plus any ``--key value`` overrides) with every key of :data:`REFERENCE_OPTIONS` set to the reference's value
    (printing each one it changed; an override asking for another value stops with an error naming it), loads the
    converted weights into it (so an architecture mismatch stops here) and saves the plain state dict to ``output``
    (default: the config's ``model_path``) with its ``model.json`` recording the options, which every config that
    loads the weights then checks. Returns the path written."""
    from monai.bundle import ConfigParser

    if not os.path.isfile(reference_checkpoint):
        raise FileNotFoundError(f"reference_checkpoint {reference_checkpoint!r} does not exist")
    refused = {k: v for k, v in override.items() if k in REFERENCE_OPTIONS and v != REFERENCE_OPTIONS[k]}
    if refused:
        raise ValueError(
            "a reference checkpoint computes the reference's function, but "
            + ", ".join(f"--{k} {_option(v)}" for k, v in refused.items())
            + " would make the network compute another one with its weights; the reference has "
            + ", ".join(f"{k} {_option(REFERENCE_OPTIONS[k])}" for k in refused)
            + ": drop these options"
        )
    parser = ConfigParser()
    parser.read_config(config_file)
    for key, value in override.items():
        parser[key] = value
    changed = []
    for key, value in REFERENCE_OPTIONS.items():
        if key in parser and parser[key] != value:
            changed.append(f"--{key} {_option(value)}")
            parser[key] = value
    net = parser.get_parsed_content("network_def")
    checkpoint = torch.load(reference_checkpoint, map_location="cpu", weights_only=False)
    state = convert_reference_state_dict(checkpoint, net, source=reference_checkpoint)
    net.load_state_dict(state)
    output = output or parser.get_parsed_content("model_path")
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    torch.save(state, output)
    sidecar = os.path.splitext(output)[0] + ".json"
    with open(sidecar, "w") as f:
        json.dump(
            {"converted_from": os.path.abspath(reference_checkpoint), "network_options": net.function_options()},
            f,
            indent=1,
        )
    print(f"wrote {output}: {sum(t.numel() for t in state.values()):,} parameters from {reference_checkpoint}")
    if changed:
        print(
            f"set to the reference's function (the configs had other values): {' '.join(changed)}; pass the same "
            "options (or a preset overlay such as configs/vdvae_32.json) to inference.json, evaluate.json, "
            f"reconstruct.json and anomaly.json: {sidecar} records them and loading stops when they differ"
        )
    return output


if __name__ == "__main__":
    import fire

    fire.Fire(convert)
