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

import torch

_MASK64 = (1 << 64) - 1
# Added to ``[key, counter]`` to advance the counter: one tensor op instead of a host round trip.
_NEXT = torch.tensor([0, 1], dtype=torch.int64)


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


class seeded_rng:  # noqa: N801 - used as a function: ``with seeded_rng(rng, device):``
    """Run the block with the CPU (and ``device``'s) RNG seeded from ``rng``; restore it after.

    What ``torch.random.fork_rng`` does for these generators, without its per-call checks:
    each generator's state is saved with ``get_state`` and put back with ``set_state`` (the
    same state tensors ``fork_rng`` saves and restores), so the caller's RNG and the block's
    random numbers are bitwise those of the forked version. A class rather than a generator
    function: a step enters it once per call, and a generator-based context manager costs
    more than the seeding itself.

    Args:
        rng: ``state.rng``, a CPU int64 tensor ``[key, counter]``.
        device: the state's device (its CUDA generator is forked too).
    """

    __slots__ = ("generators", "saved", "seed")

    def __init__(self, rng: torch.Tensor, device: torch.device) -> None:
        self.generators = [torch.default_generator]
        if device.type == "cuda":
            torch.cuda.init()  # a no-op once CUDA is up; fills ``default_generators``
            self.generators.append(torch.cuda.default_generators[device.index or 0])
        self.seed = step_seed(rng)

    def __enter__(self) -> None:
        self.saved = [g.get_state() for g in self.generators]
        for g in self.generators:
            g.manual_seed(self.seed)

    def __exit__(self, *exc: object) -> None:
        for g, state in zip(self.generators, self.saved):
            g.set_state(state)


def next_rng(rng: torch.Tensor) -> torch.Tensor:
    """The state RNG after one step: ``[key, counter + 1]`` (a CPU int64 tensor)."""
    return rng + _NEXT
