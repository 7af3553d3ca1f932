"""The step's randomness: one seed per step from the state's ``[key, counter]``.

A step seeds a forked RNG (the CPU's and the state's CUDA device's) from a fixed integer mix of
``state.rng`` and returns ``[key, counter + 1]``; the caller's global RNG is left as it was. The
same state gives the same dropout masks on every call, eager, compiled or replayed.

Example:
    >>> step_seed(torch.tensor([0, 0])) == step_seed(torch.tensor([0, 0]))
    True
    >>> next_rng(torch.tensor([7, 3])).tolist()
    [7, 4]
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

_MASK64 = (1 << 64) - 1


def step_seed(rng: torch.Tensor) -> int:
    """The seed a step uses: a splitmix64 mix of the state's ``[key, counter]``.

    Args:
        rng: ``state.rng``, a CPU int64 tensor ``[key, counter]``.

    Returns:
        A non-negative 63-bit integer seed.
    """
    key, counter = (int(v) for v in rng.tolist())
    z = (key * 0x9E3779B97F4A7C15 + counter + 0x632BE59BD9B4E019) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 1


@contextlib.contextmanager
def seeded_rng(rng: torch.Tensor, device: torch.device) -> Iterator[None]:
    """Run the block with the CPU (and ``device``'s) RNG seeded from ``rng``; restore it after."""
    devices = [device.index or 0] if device.type == "cuda" else []
    seed = step_seed(rng)
    with torch.random.fork_rng(devices=devices, device_type="cuda"):
        torch.default_generator.manual_seed(seed)
        for index in devices:
            torch.cuda.default_generators[index].manual_seed(seed)
        yield


def next_rng(rng: torch.Tensor) -> torch.Tensor:
    """The state RNG after one step: ``[key, counter + 1]`` (a CPU int64 tensor)."""
    key, counter = (int(v) for v in rng.tolist())
    return torch.tensor([key, counter + 1], dtype=torch.int64)
