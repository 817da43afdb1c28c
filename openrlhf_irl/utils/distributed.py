"""Small process-group helpers shared by the CPU layer and the online samplers."""

from __future__ import annotations

import socket

import torch


def free_port(host: str = "") -> int:
    """A TCP port free on ``host`` right now (``""``: all interfaces, for peers on other nodes)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) without one."""
    if torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1
