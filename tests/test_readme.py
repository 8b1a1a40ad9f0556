"""The commands in README.md and docs/*.md name things that exist.

Every ``bash`` block is split into commands. For ``monai.bundle run`` (plain or under ``torchrun``), each config file
must exist and each ``--key`` must be a key of the merged configs (MONAI's own ``--config_file`` / ``--meta_file`` /
``--logging_file`` aside), and a run id other than ``run`` must be a section of them. For ``python -m <module>``, the
module must exist and each ``--option`` must be a parameter of the function that ``fire`` runs (the subcommand's, when
one is given). Options written in the README's prose (`` `--key value` ``) must be a key of some config or an option
of some tool. Placeholders (``<folder>``, ``$B``) are values and are not checked.
"""

import ast
import glob
import importlib.util
import inspect
import json
import os
import re
import shlex

import pytest
from monai.bundle import ConfigParser

from tests.conftest import ROOT

DOCUMENTS = ["README.md", "CHANGELOG.md", *sorted(os.path.relpath(p, ROOT) for p in glob.glob(f"{ROOT}/docs/*.md"))]
MONAI_RUN_ARGS = {"config_file", "meta_file", "logging_file", "args_file"}
OTHER_TOOLS_ARGS = {"nnodes", "nproc_per_node", "node_rank", "rdzv_backend", "rdzv_endpoint", "standalone", "logdir"}


def bash_commands(text: str) -> list[str]:
    """The commands of every ```bash block: continuation lines joined, comments dropped, split at ``&&``."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        block = re.sub(r"\\\n\s*", " ", block)
        for line in block.splitlines():
            line = line.split(" # ")[0].strip()
            if line and not line.startswith("#"):
                commands += [c.strip() for c in line.split("&&") if c.strip()]
    return commands


def options(args: list[str]) -> list[str]:
    """The names of ``--name value`` and ``--name=value`` arguments."""
    return [a[2:].split("=")[0] for a in args if a.startswith("--")]


def parameters_of(mod, function) -> set[str]:
    """The parameters of ``function``; for ``def main(**kwargs): f(**kwargs)``, those of ``f``."""
    parameters = inspect.signature(function).parameters
    if list(parameters) == ["kwargs"]:
        called = re.findall(r"(?<!def )\b(\w+)\(\*\*kwargs\)", inspect.getsource(function))
        assert called, f"{function.__name__} takes **kwargs and passes them to no function"
        return parameters_of(mod, getattr(mod, called[0]))
    return set(parameters)


def fire_target(module: str, subcommand: str | None):
    """The function ``python -m module [subcommand]`` runs through ``fire.Fire``."""
    mod = importlib.import_module(module)
    source = inspect.getsource(mod)
    if subcommand is not None and callable(getattr(mod, subcommand, None)) and f"Fire({subcommand}," in source:
        return getattr(mod, subcommand)
    plain = re.findall(r"fire\.Fire\((\w+)[,)]", source)
    default = [name for name in plain if f"Fire({name}, command=" not in source]
    assert default, f"{module} has no fire entry point"
    return getattr(mod, default[-1])


def check_bundle_run(args: list[str], where: str) -> None:
    i = args.index("monai.bundle") + 1
    run_id = args[i + 1] if i + 1 < len(args) and not args[i + 1].startswith("--") else "run"
    names = options(args[i + 1 :])
    value = args[args.index("--config_file") + 1] if "--config_file" in args else None
    assert value is not None, f"{where}: no --config_file"
    files = ast.literal_eval(value) if value.startswith("[") else [value]
    if any("$" in f or "<" in f for f in files):
        return
    for f in files:
        assert os.path.isfile(os.path.join(ROOT, f)), f"{where}: config {f} does not exist"
    parser = ConfigParser()
    parser.read_config([os.path.join(ROOT, f) for f in files])
    assert run_id in parser, f"{where}: the configs have no section {run_id!r}"
    for name in names:
        if name not in MONAI_RUN_ARGS:
            assert name in parser, f"{where}: --{name} is not a key of {files}"


def check_module(args: list[str], where: str) -> None:
    i = args.index("-m")
    module = args[i + 1]
    assert importlib.util.find_spec(module) is not None, f"{where}: module {module} does not exist"
    rest = args[i + 2 :]
    subcommand = rest[0] if rest and not rest[0].startswith("-") else None
    parameters = parameters_of(importlib.import_module(module), fire_target(module, subcommand))
    unknown = [name for name in options(rest) if name not in parameters and name != "help"]
    if unknown and "overrides" in parameters and "config_file" in parameters:
        # a tool that takes a config's overrides (``**overrides``): the rest must be keys of that config
        files = [rest[rest.index("--config_file") + 1] if "--config_file" in rest else "configs/train.json"]
        parser = ConfigParser()
        parser.read_config([os.path.join(ROOT, f) for f in files])
        unknown = [name for name in unknown if name not in parser]
    assert not unknown, f"{where}: {module} has no option --{unknown[0] if unknown else ''}"


def documented_commands():
    for doc in DOCUMENTS:
        with open(os.path.join(ROOT, doc)) as f:
            for command in bash_commands(f.read()):
                yield doc, command


COMMANDS = list(documented_commands())


def test_the_documents_have_commands_to_check():
    readme = [c for d, c in COMMANDS if d == "README.md"]
    assert sum("monai.bundle run" in c for c in readme) >= 10
    assert any("torchrun" in c for c in readme) and any("-m scripts." in c for d, c in COMMANDS)


@pytest.mark.parametrize("doc,command", COMMANDS, ids=[f"{d}:{i}" for i, (d, _) in enumerate(COMMANDS)])
def test_documented_command_names_what_exists(doc, command):
    args = shlex.split(command)
    where = f"{doc}: {command[:100]}"
    if "-m" not in args:
        return  # pip, cd, mkdir, ...: nothing of the bundle's
    module = args[args.index("-m") + 1]
    if module == "monai.bundle" and args[args.index("-m") + 2] == "run":
        check_bundle_run(args, where)
    elif module.startswith("scripts."):
        check_module(args, where)


def known_options() -> set[str]:
    keys = set()
    for path in glob.glob(f"{ROOT}/configs/*.json"):
        with open(path) as f:
            config = json.load(f)
        keys |= {k.lstrip("+").split("#")[0] for k in config}  # an overlay's "train#sampler" names train
    for path in glob.glob(f"{ROOT}/scripts/**/*.py", recursive=True):
        module = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
        with open(path) as f:
            if "fire.Fire(" not in f.read():
                continue
        mod = importlib.import_module(module)
        for name in re.findall(r"fire\.Fire\((\w+)[,)]", inspect.getsource(mod)):
            keys |= parameters_of(mod, getattr(mod, name))
    return keys


def test_options_in_the_readme_prose_exist():
    with open(os.path.join(ROOT, "README.md")) as f:
        prose = re.sub(r"```.*?```", "", f.read(), flags=re.S)
    named = {m for span in re.findall(r"`([^`]*)`", prose) for m in re.findall(r"--([a-z_]+)", span)}
    assert {"max_epochs", "seed", "use_latent_prior"} <= named
    unknown = named - known_options() - MONAI_RUN_ARGS - OTHER_TOOLS_ARGS - {"key"}  # torchrun, tensorboard
    assert not unknown, f"README names options no config or tool has: {sorted(unknown)}"


def test_the_check_fails_on_a_wrong_name():
    with pytest.raises(AssertionError, match="--batch_sise is not a key"):
        check_bundle_run(shlex.split("python -m monai.bundle run --config_file configs/train.json --batch_sise 2"), "x")
    with pytest.raises(AssertionError, match="config configs/nope.json does not exist"):
        check_bundle_run(shlex.split("python -m monai.bundle run --config_file \"['configs/nope.json']\""), "x")
    with pytest.raises(AssertionError, match="has no option --budget"):
        check_module(shlex.split("python -m scripts.tools.quality_benchmark --budget 9"), "x")
