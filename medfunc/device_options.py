"""The Trainer options that only mean something on some devices, resolved for the device at hand.

``pin_memory``, ``cudnn_benchmark`` and ``ddp_backend="nccl"`` act on CUDA only. On another
device each is resolved to what it can do there (no pinning, cuDNN untouched, the Gloo backend)
and the choice is logged once per process at INFO, so that no option is ignored silently.
``ddp_find_unused_parameters`` is accepted for the original's configs: medfunc's data-parallel
step always treats a parameter without a gradient as ``find_unused_parameters=True`` does
(see :mod:`medfunc.distributed.ddp`), which is said once at INFO when the option is False.

Example:
    >>> config = TrainerConfig(num_workers=0)
    >>> options = resolve(config, torch.device("cpu"))
    >>> options.pin_memory, options.ddp_backend
    (False, 'gloo')
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import torch

from medfunc.trainer_config import TrainerConfig

__all__ = ["DeviceOptions", "apply_cudnn_benchmark", "resolve"]

log = logging.getLogger("medfunc.trainer")
_logged: set[str] = set()


class DeviceOptions(NamedTuple):
    """The device-dependent options as they apply on one device.

    Attributes:
        pin_memory: DataLoader workers hand over page-locked batches (CUDA only).
        ddp_backend: the ``torch.distributed`` backend a multi-process run joins with.
    """

    pin_memory: bool
    ddp_backend: str


def _info_once(message: str, *args: object) -> None:
    key = message % args
    if key not in _logged:
        _logged.add(key)
        log.info(message, *args)


def resolve(
    config: TrainerConfig, device: torch.device, *, multi_process: bool = False
) -> DeviceOptions:
    """``pin_memory`` and ``ddp_backend`` as they apply on ``device`` (INFO once when changed).

    Args:
        config: the options.
        device: the training device.
        multi_process: the run is a multi-process one (the distribution options are noted).

    Returns:
        The resolved options.

    Example:
        >>> resolve(TrainerConfig(pin_memory=False), torch.device("cpu")).pin_memory
        False
    """
    cuda = device.type == "cuda"
    if config.pin_memory and not cuda:
        _info_once("pin_memory=True has no effect on %s: batches are not page-locked", device.type)
    backend = config.ddp_backend
    if backend == "nccl" and not cuda:
        backend = "gloo"
    if multi_process and config.ddp_backend != backend:
        _info_once(
            "ddp_backend='nccl' needs CUDA; a multi-process run on %s uses Gloo", device.type
        )
    if multi_process and not config.ddp_find_unused_parameters:
        _info_once(
            "ddp_find_unused_parameters=False: medfunc's data-parallel step finds unused "
            "parameters by itself on every step, as DistributedDataParallel("
            "find_unused_parameters=True) does; the option changes nothing"
        )
    return DeviceOptions(pin_memory=config.pin_memory and cuda, ddp_backend=backend)


def apply_cudnn_benchmark(config: TrainerConfig, device: torch.device) -> None:
    """Set ``torch.backends.cudnn.benchmark`` from ``cudnn_benchmark`` on CUDA (INFO once else).

    cuDNN's autotuner is a process-wide setting of PyTorch; on CUDA it is set to the option's
    value, on other devices it is left as it is.

    Args:
        config: the options.
        device: the training device.

    Example:
        >>> apply_cudnn_benchmark(TrainerConfig(), torch.device("cpu"))   # logs once, sets nothing
    """
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = config.cudnn_benchmark
    elif config.cudnn_benchmark:
        _info_once("cudnn_benchmark=True has no effect on %s (cuDNN is CUDA's)", device.type)
