"""Trainer plug-ins, discovered through the ``openrlhf.trainers`` entry-point group.

An entry point names a :class:`TrainerPlugin`. The same object serves the plugin's own CLIs
(``openrlhf_irl.cli.train_sft`` / ``train_rm``) and an OpenRLHF patched with ``patches/0001-*``:
both ask it for the trainer class, the dataset class and the extra command-line arguments.
"""

from __future__ import annotations

import argparse
import importlib
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Callable, Optional

ENTRY_POINT_GROUP = "openrlhf.trainers"


def _load(path: str):
    from openrlhf_irl import compat

    compat.activate()  # plug-in classes import OpenRLHF, which needs the CPU layer on machines without CUDA
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


@dataclass(frozen=True)
class TrainerPlugin:
    """A trainer that an OpenRLHF training CLI can run instead of its default one.

    ``task`` is the CLI it belongs to (``"sft"`` or ``"rm"``). ``trainer`` and ``dataset`` are
    ``"module:Name"`` paths, imported only when used; ``dataset=None`` keeps the CLI's own dataset.
    """

    name: str
    task: str
    trainer: Optional[str] = None
    dataset: Optional[str] = None
    add_arguments: Optional[Callable[[argparse.ArgumentParser], None]] = None
    description: str = ""

    def trainer_class(self):
        return _load(self.trainer) if self.trainer else None

    def dataset_class(self):
        return _load(self.dataset) if self.dataset else None

    def extend_parser(self, parser: argparse.ArgumentParser) -> None:
        if self.add_arguments is not None:
            self.add_arguments(parser)


class UnknownTrainerError(KeyError):
    def __init__(self, name: str, task: str, known: list[str]):
        self.name, self.task, self.known = name, task, known
        super().__init__(f"unknown trainer {name!r} for train_{task}; known trainers: {', '.join(known) or 'none'}")

    def __str__(self) -> str:
        return self.args[0]


def available_trainers(task: Optional[str] = None) -> dict[str, TrainerPlugin]:
    """Installed trainer plug-ins by name, optionally only those for ``task``."""
    found = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        plugin = ep.load()
        if task is None or plugin.task == task:
            found[ep.name] = plugin
    return dict(sorted(found.items()))


def get_trainer(name: str, task: str) -> TrainerPlugin:
    trainers = available_trainers(task)
    if name not in trainers:
        raise UnknownTrainerError(name, task, list(trainers))
    return trainers[name]
