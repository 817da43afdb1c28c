"""Every command in examples/*.sh parses with the argument parser of the CLI it calls (unknown flag = failure)."""

from __future__ import annotations

import importlib
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.sh"))


def script_defaults(path: Path) -> dict:
    """The script's ``VAR=${VAR:-default}`` values, evaluated by bash."""
    assignments = "\n".join(l for l in path.read_text().splitlines() if re.match(r"^[A-Z_]+=", l))
    out = subprocess.run(["bash", "-c", f"set -a\n{assignments}\nenv -0"], capture_output=True, text=True,
                         check=True, env={"PATH": os.environ["PATH"]}).stdout
    return dict(kv.split("=", 1) for kv in out.split("\0") if "=" in kv)


def commands(path: Path) -> list[tuple[str, list[str]]]:
    """(module, argv) for each ``python -m MODULE`` / ``deepspeed --module MODULE`` line of a script."""
    env = script_defaults(path)
    # the script's variables substituted first, as bash does: an unquoted one may hold several flags (or none)
    text = _subst(re.sub(r"\\\n", " ", path.read_text()), env)
    found = []
    for line in text.splitlines():
        if line.strip().startswith("#"):
            continue
        tokens = shlex.split(line, comments=True)
        for i, tok in enumerate(tokens[:-1]):
            if tok in ("-m", "--module") and tokens[i + 1].startswith(("openrlhf", "torch")) is not None:
                module = tokens[i + 1]
                if module.startswith(("openrlhf.", "openrlhf_irl.")):
                    argv = [os.path.expandvars(_subst(a, env)) for a in tokens[i + 2:]]
                    found.append((module, argv))
                break
    return found


def _subst(arg: str, env: dict) -> str:
    return re.sub(r"\$\{?([A-Z_]+)\}?", lambda m: env.get(m.group(1), m.group(0)), arg)


# train_ppo_ray imports vLLM at module top, which a CPU machine lacks. Its parser is only reachable by running the
# module, so the check runs it in a child process with placeholder ``vllm`` modules: only the parser is exercised.
PARSE_WITHOUT_VLLM = r"""
import importlib.abc, importlib.machinery, sys, types
from unittest.mock import MagicMock

class Placeholder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path, target=None):
        if name == "vllm" or name.startswith("vllm."):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
    def create_module(self, spec):
        module = types.ModuleType(spec.name)
        module.__path__ = []
        module.__getattr__ = lambda attr: MagicMock(name=f"{spec.name}.{attr}")
        return module
    def exec_module(self, module):
        pass

sys.meta_path.insert(0, Placeholder())
from openrlhf_irl.cli.launcher import parse_module_args
parse_module_args(sys.argv[1], sys.argv[2:])
"""


def parse(module: str, argv: list[str]):
    from openrlhf_irl.cli.launcher import build_args, parse_module_args

    if module in ("openrlhf_irl.cli.train_sft", "openrlhf_irl.cli.train_rm"):
        return build_args(module.rsplit("_", 1)[1], argv)
    if module == "openrlhf.cli.train_ppo_ray":
        proc = subprocess.run([sys.executable, "-c", PARSE_WITHOUT_VLLM, module, *argv], capture_output=True,
                              text=True, timeout=300)
        if proc.returncode != 0:
            print(proc.stderr[-3000:])
            raise SystemExit(proc.returncode)
        return None
    if module.startswith("openrlhf."):
        return parse_module_args(module, argv)
    return importlib.import_module(module).build_parser().parse_args(argv)


def test_every_example_script_is_found():
    names = {p.name for p in EXAMPLES}
    assert {"iq_learn_sft.sh", "afd_hh_rlhf.sh", "ppo_afd_reward_model.sh", "ppo_afd_log_ratio.sh"} <= names


@pytest.mark.parametrize("script", EXAMPLES, ids=lambda p: p.name)
def test_script_flags_parse_with_the_real_parsers(script):
    cmds = commands(script)
    assert cmds, f"{script.name}: no CLI invocation found"
    for module, argv in cmds:
        try:
            parse(module, argv)
        except SystemExit as exit_:
            pytest.fail(f"{script.name}: {module} rejected its flags (exit {exit_.code}): {' '.join(argv)}")


@pytest.mark.parametrize("module,flag", [("openrlhf_irl.cli.train_sft --trainer irl_iq", "--irl.td_wieght 0.1"),
                                         ("openrlhf.cli.train_ppo_ray", "--actor.adam.learning_rate 1e-6")])
def test_a_wrong_flag_is_caught(tmp_path, module, flag):
    bad = tmp_path / "bad.sh"
    bad.write_text(f"MODEL=${{MODEL:-m}}\npython -m {module} \\\n   --ds.zero_stage 2 {flag}\n")
    (module, argv), = commands(bad)
    with pytest.raises(SystemExit):
        parse(module, argv)
