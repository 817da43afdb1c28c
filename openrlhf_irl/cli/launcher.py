"""Run OpenRLHF's own training CLIs with a trainer chosen by ``--trainer``.

OpenRLHF 0.11.2 builds its argument parser inside ``if __name__ == "__main__"``, so the launcher runs
that very module as ``__main__`` (all of its arguments, checks and post-processing stay OpenRLHF's) and
only (1) adds ``--trainer`` plus the plug-in's arguments to the parser when it parses, and (2) points the
names the module imports, its trainer and dataset classes, at the plug-in's for the duration of the run.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import runpy
import sys
from dataclasses import dataclass

from openrlhf_irl import compat
from openrlhf_irl.registry import TrainerPlugin, UnknownTrainerError, get_trainer


@dataclass(frozen=True)
class TaskCLI:
    module: str
    trainer: tuple[str, str]
    dataset: tuple[str, str]


TASKS = {
    "sft": TaskCLI("openrlhf.cli.train_sft", ("openrlhf.trainer.sft_trainer", "SFTTrainer"), ("openrlhf.datasets", "SFTDataset")),
    "rm": TaskCLI("openrlhf.cli.train_rm", ("openrlhf.trainer.rm_trainer", "RewardModelTrainer"), ("openrlhf.datasets", "RewardDataset")),
}


@contextlib.contextmanager
def substitute(module_name: str, attr: str, value):
    """Temporarily bind ``module_name.attr`` to ``value`` (no-op when ``value`` is None)."""
    if value is None:
        yield
        return
    module = importlib.import_module(module_name)
    original = getattr(module, attr)
    setattr(module, attr, value)
    try:
        yield
    finally:
        setattr(module, attr, original)


class _Parsed(Exception):
    def __init__(self, args):
        super().__init__("arguments parsed")
        self.parsed = args


@contextlib.contextmanager
def plugin_arguments(plugin: TrainerPlugin | None, stop_after_parse: bool = False, add: bool = True):
    """Make the next ``ArgumentParser.parse_args`` call also accept ``--trainer`` and the plug-in's arguments.

    With ``stop_after_parse`` the call raises :class:`_Parsed` carrying the namespace instead of returning.
    """
    original = argparse.ArgumentParser.parse_args

    def parse_args(self, args=None, namespace=None):
        argparse.ArgumentParser.parse_args = original
        if add:
            self.add_argument("--trainer", type=str, default=plugin.name, help="registered trainer (openrlhf.trainers)")
            plugin.extend_parser(self)
        parsed = original(self, args, namespace)
        if stop_after_parse:
            raise _Parsed(parsed)
        return parsed

    argparse.ArgumentParser.parse_args = parse_args
    try:
        yield
    finally:
        argparse.ArgumentParser.parse_args = original


@contextlib.contextmanager
def plugin_classes(task: str, plugin: TrainerPlugin):
    cli = TASKS[task]
    with substitute(*cli.trainer, plugin.trainer_class()), substitute(*cli.dataset, plugin.dataset_class()):
        yield


def _guarded_get_strategy(original):
    """OpenRLHF's ``get_strategy`` (the first call of its ``train``) that first checks every model the run loads
    (:func:`openrlhf_irl.cli.train_checks.check_models`), and whose strategy claims the run's output directories
    (the marker) and saves models safely (finite weights, staged then moved in: :func:`openrlhf_irl.utils.checkpoint.safe_save_model`)."""
    from openrlhf_irl.cli.train_checks import check_models, claim_outputs, flat
    from openrlhf_irl.utils.checkpoint import safe_save_model

    def get_strategy(args):
        check_models(flat(args))  # every model whole and fitting its tokenizer, before any is loaded
        strategy = original(args)
        claim_outputs(args)
        safe_save_model(strategy)
        return strategy

    return get_strategy


@contextlib.contextmanager
def guarded_strategy(module_name: str = "openrlhf.utils"):
    """Bind ``module_name.get_strategy`` to :func:`_guarded_get_strategy` for the duration of a run."""
    module = importlib.import_module(module_name)
    with substitute(module_name, "get_strategy", _guarded_get_strategy(module.get_strategy)):
        yield


def openrlhf_resolves_trainers() -> bool:
    """True for an OpenRLHF with ``patches/0001`` applied: its CLIs take ``--trainer`` themselves."""
    return importlib.util.find_spec("openrlhf.utils.plugins") is not None


def resolve(task: str, argv: list[str]) -> TrainerPlugin:
    """The plug-in named by ``--trainer`` in ``argv``; exits with the known names if it is not registered."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--trainer", default=task)
    known, _ = pre.parse_known_args(argv)
    try:
        return get_trainer(known.trainer, task)
    except UnknownTrainerError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


@contextlib.contextmanager
def as_main(module: str, argv: list[str]):
    """Run ``module`` as ``__main__`` with ``argv``; on a CPU machine its ``--ds.param_dtype`` also takes fp32/auto."""
    from openrlhf_irl.compat import param_dtype

    old_argv = sys.argv
    sys.argv = [module, *argv]
    try:
        with param_dtype.accepting_fp32() if compat.is_active() else contextlib.nullcontext():
            yield
    finally:
        sys.argv = old_argv


def _parse_as_main(module: str, argv: list[str], plugin: TrainerPlugin | None = None, add: bool = False):
    from openrlhf.utils.config import hierarchize

    try:
        with as_main(module, argv), plugin_arguments(plugin, stop_after_parse=True, add=add):
            runpy.run_module(module, run_name="__main__")
    except _Parsed as done:
        return hierarchize(done.parsed)
    raise RuntimeError(f"{module} did not parse its arguments")


def parse_module_args(module: str, argv: list[str]):
    """Parse ``argv`` with the parser an OpenRLHF CLI module builds under ``__main__`` (nested args, no plug-ins)."""
    compat.activate()
    return _parse_as_main(module, argv)


def build_args(task: str, argv: list[str]):
    """Parse ``argv`` with OpenRLHF's own parser for ``task`` (plus the plug-in's arguments) into nested args."""
    compat.activate()
    plugin = resolve(task, argv)
    return _parse_as_main(TASKS[task].module, argv, plugin, add=not openrlhf_resolves_trainers())


def run(task: str, argv: list[str] | None = None) -> None:
    """Run OpenRLHF's ``train_<task>`` CLI with the trainer named by ``--trainer``."""
    compat.activate()
    argv = sys.argv[1:] if argv is None else list(argv)
    plugin = resolve(task, argv)
    module = TASKS[task].module
    from openrlhf_irl.utils.checkpoint import NonFiniteWeightsError

    try:
        if openrlhf_resolves_trainers():  # patched OpenRLHF: it adds the arguments and picks the classes itself
            with as_main(module, argv), guarded_strategy():
                runpy.run_module(module, run_name="__main__")
            return
        with as_main(module, argv), plugin_arguments(plugin), plugin_classes(task, plugin), guarded_strategy():
            runpy.run_module(module, run_name="__main__")
    except NonFiniteWeightsError as err:  # one line, exit 1
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(1) from None


def train(task: str, args) -> None:
    """Call OpenRLHF's ``train(args)`` for ``task`` with the trainer named by ``args.trainer``."""
    compat.activate()
    plugin = get_trainer(getattr(args, "trainer", task), task)
    cli = TASKS[task]
    module = importlib.import_module(cli.module)
    if openrlhf_resolves_trainers():
        with guarded_strategy(cli.module):
            module.train(args)
        return
    # ``train`` looks its trainer and dataset classes up in the CLI module's own namespace.
    with substitute(cli.module, cli.trainer[1], plugin.trainer_class()), \
            substitute(cli.module, cli.dataset[1], plugin.dataset_class()), guarded_strategy(cli.module):
        module.train(args)
