"""Shared pieces of the optimizer tests: small real models, fixed data, real gradients.

Example:
    >>> model = make_model()
    >>> grads = real_grads(model)            # OrderedDict name -> gradient of the fixed loss
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator

import pytest
import torch
from torch import nn

from medfunc.optim import UpdateContext

_g = torch.Generator().manual_seed(1)
X = torch.randn(32, 6, generator=_g)
Y = torch.randint(0, 3, (32,), generator=_g)


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Tiny tensors: intra-op threads only add overhead (and contention on shared CI hosts).

    Autouse in every test module that imports it.
    """
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class MLP(nn.Module):
    """Linear -> LayerNorm -> tanh -> Linear, with parameter names fc1.*, ln.*, fc2.*."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 16)
        self.ln = nn.LayerNorm(16)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.ln(self.fc1(x))))


def make_model() -> MLP:
    """The :class:`MLP`, initialized from seed 0."""
    torch.manual_seed(0)
    return MLP()


def make_sequential_model() -> nn.Sequential:
    """The same layers as an ``nn.Sequential`` (parameter names 0.*, 1.*, 3.*), seed 0."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.LayerNorm(16), nn.Tanh(), nn.Linear(16, 3))


def real_grads(model: nn.Module) -> OrderedDict:
    """Gradients of a fixed loss on fixed data at the model's current parameters."""
    model.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(X), Y).backward()
    return OrderedDict((n, p.grad.detach().clone()) for n, p in model.named_parameters())


def params_of(model: nn.Module) -> OrderedDict:
    """Detached copies of the model's parameters, in model order."""
    return OrderedDict((n, p.detach().clone()) for n, p in model.named_parameters())


def load_params(model: nn.Module, params: OrderedDict) -> nn.Module:
    """Copy ``params`` (name -> tensor) into the model's parameters in place; return the model."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(params[n])
    return model


def ctx_at(step: int, **kwargs: object) -> UpdateContext:
    """An :class:`UpdateContext` at integer ``step`` (an int64 tensor), plus ``kwargs``."""
    return UpdateContext(step=torch.tensor(step), **kwargs)
