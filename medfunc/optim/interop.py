"""Conversion between medfunc optimizer state and ``torch.optim`` state dicts.

The metadata this needs lives on the transformation itself: ``adamw``/``adam``/``sgd`` set
``tx.spec`` (an :class:`~medfunc.optim.optimizers.OptimizerSpec`) and :func:`chain` keeps its
parts in ``tx.children``, so :func:`~medfunc.optim.base.find_optimizer` finds the optimizer and
its state inside any chain.

Parameter indices follow ``torch.optim``: a state dict numbers parameters in param_group order
(the groups of :func:`torch_param_groups`), which equals model order only when there is a single
group. Every group also carries ``param_names``.

Example:
    >>> from collections import OrderedDict
    >>> model = torch.nn.Linear(4, 2)
    >>> model_params = OrderedDict(model.named_parameters())
    >>> params = OrderedDict((name, p.detach().clone()) for name, p in model_params.items())
    >>> tx = mf.optim.adamw(1e-3)
    >>> opt_state = tx.init(params)
    >>> sd = to_torch_state_dict(tx, opt_state, params, step=100)
    >>> torch_opt = torch.optim.AdamW(torch_param_groups(tx, model_params), foreach=True)
    >>> torch_opt.load_state_dict(sd)                 # continue in plain PyTorch
    >>> opt_state = from_torch_state_dict(tx, torch_opt.state_dict(), params)   # and back
    >>> [group["param_names"] for group in sd["param_groups"]]   # decayed, then not decayed
    [['weight'], ['bias']]
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from medfunc.errors import ConfigError
from medfunc.optim import torch_adapter
from medfunc.optim.base import (
    GradientTransformation,
    OptState,
    Params,
    find_optimizer,
    get_substate,
    replace_substate,
)
from medfunc.optim.masks import ParamGroup
from medfunc.optim.optimizers import AdamState, OptimizerSpec, SGDState


def _check_params(params: Any, who: str) -> None:
    if not isinstance(params, Mapping) or not all(isinstance(v, Tensor) for v in params.values()):
        raise ConfigError(
            f"{who} expects the trainable params as an OrderedDict name -> tensor in model "
            f"order, got {type(params).__name__}"
        )


def _spec_groups(tx: GradientTransformation, params: Params) -> tuple[OptimizerSpec, tuple]:
    spec, _ = find_optimizer(tx)
    return spec, spec.groups(list(params))


def torch_kernel_flags(tx: GradientTransformation, device: torch.device) -> dict[str, bool]:
    """The ``foreach``/``fused``/``capturable`` constructor flags matching ``tx``'s kernel path.

    Args:
        tx: an optimizer or a chain holding one.
        device: the parameters' device.

    Returns:
        e.g. ``{"foreach": True}`` or ``{"fused": True}`` (plus ``capturable`` for Adam).
    """
    spec, _ = find_optimizer(tx)
    cfg = spec.kernel_config(device)
    flags: dict[str, bool] = {"fused": True} if cfg.fused else {"foreach": True}
    if spec.is_adam and cfg.capturable:
        flags["capturable"] = True
    return flags


def torch_param_groups(
    tx: GradientTransformation, params: Mapping[str, Tensor], *, step: int | Tensor = 0
) -> list[dict[str, Any]]:
    """The param_groups to pass to ``torch.optim.X`` so its grouping equals ``tx``'s.

    Each group holds ``params`` as ``(name, tensor)`` pairs (torch then records
    ``param_names``), its ``lr`` (the base LR at ``step`` times the group's multiplier) and its
    ``weight_decay``. Pass the optimizer's other hyperparameters (betas, momentum, ...) and the
    kernel flag (:func:`torch_kernel_flags`) to the constructor, or use :func:`torch_optimizer`.

    Args:
        tx: an optimizer or a chain holding one.
        params: name -> parameter, the trainable parameters in model order (e.g.
            ``OrderedDict(model.named_parameters())``).
        step: the update count at which to evaluate an LR schedule.

    Returns:
        A fresh list of group dicts (torch mutates them, so build one per optimizer).

    Example:
        >>> from collections import OrderedDict
        >>> model = torch.nn.Linear(4, 2)
        >>> groups = torch_param_groups(mf.optim.adamw(1e-3), OrderedDict(model.named_parameters()))
        >>> opt = torch.optim.AdamW(groups, foreach=True)
        >>> [(group["param_names"], group["weight_decay"]) for group in opt.param_groups]
        [(['weight'], 0.01), (['bias'], 0.0)]
    """
    _check_params(params, "torch_param_groups")
    spec, groups = _spec_groups(tx, params)
    base = spec.lr_at(step)
    return [
        {
            "params": [(n, params[n]) for n in g.names],
            "lr": base * g.lr_multiplier if g.lr_multiplier != 1.0 else base,
            "weight_decay": g.weight_decay,
        }
        for g in groups
    ]


def torch_optimizer(
    tx: GradientTransformation, params: Mapping[str, Tensor], *, step: int | Tensor = 0
) -> torch.optim.Optimizer:
    """Build the ``torch.optim`` optimizer equal to ``tx`` (same class, groups and kernel path).

    Args:
        tx: an optimizer or a chain holding one (other chain members, e.g. clipping, are not
            part of a torch optimizer).
        params: name -> parameter (trainable, model order).
        step: the update count at which to evaluate an LR (and beta1 / momentum) schedule.

    Returns:
        e.g. ``torch.optim.AdamW(groups, betas=..., foreach=True)`` without state.

    Example:
        >>> from collections import OrderedDict
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = torch_optimizer(mf.optim.adamw(1e-3), OrderedDict(model.named_parameters()))
        >>> type(opt).__name__, len(opt.param_groups)
        ('AdamW', 2)
    """
    _check_params(params, "torch_optimizer")
    if torch_adapter.find_adapter(tx) is not None:
        return torch_adapter.torch_optimizer(tx, params, step=step)
    spec, _ = find_optimizer(tx)
    first = next(iter(params.values()), None)
    device = first.device if first is not None else torch.device("cpu")
    return spec.torch_class(
        torch_param_groups(tx, params, step=step),
        **spec.hyperparameters(step),
        **torch_kernel_flags(tx, device),
    )


def _same(tensor: Tensor) -> Tensor:
    return tensor


def _flat_names(groups: tuple[ParamGroup, ...]) -> list[str]:
    return [n for g in groups for n in g.names]


def to_torch_state_dict(
    tx: GradientTransformation,
    opt_state: OptState,
    params: Params,
    step: int | Tensor,
    *,
    copy: bool = True,
) -> dict[str, Any]:
    """Return ``opt_state`` as the ``state_dict()`` of the equal ``torch.optim`` optimizer.

    The result is what ``torch_optimizer(tx, params).state_dict()`` holds after the same
    training: ``state`` keyed by parameter index in param_group order, with ``step`` (a float32
    tensor, as torch keeps it), ``exp_avg``, ``exp_avg_sq`` (and ``max_exp_avg_sq``) or
    ``momentum_buffer``; ``param_groups`` with ``lr`` (the LR at ``step`` times the group's
    multiplier), the hyperparameters, torch's kernel flags, ``params`` index lists and
    ``param_names``. Parameters that have no state yet (no update applied to them with a
    gradient) are left out, as in torch, which creates a parameter's state at its first update
    with a gradient. Tensors are copies unless ``copy=False``. A host function: it may read
    device tensors.

    Args:
        tx: the optimizer, or a chain holding one.
        opt_state: the state of ``tx`` (``tx.init(params)`` after training).
        params: the trainable params, name -> tensor in model order.
        step: updates applied so far (``TrainState.step``), for the current LR.
        copy: with False the moments and momentum buffers are ``opt_state``'s own tensors, not
            copies: for a result that is only serialised (a checkpoint), which then costs no
            memory and no copying. Changing such a tensor changes ``opt_state``.

    Returns:
        A dict ``{"state": ..., "param_groups": [...]}`` that
        ``torch.optim.X.load_state_dict`` accepts.

    Example:
        >>> model = torch.nn.Linear(4, 1)
        >>> state = mf.init_state(model, mf.optim.adamw(1e-3), loss_fn=lambda out, x: out.mean())
        >>> state, _ = mf.train_step(state, torch.randn(8, 4))
        >>> trainable_params = state.params
        >>> sd = to_torch_state_dict(state.tx, state.opt_state, trainable_params, state.step)
        >>> sorted(sd["state"][0])   # parameter 0 ("weight"), as torch.optim.AdamW keeps it
        ['exp_avg', 'exp_avg_sq', 'step']
    """
    _check_params(params, "to_torch_state_dict")
    if torch_adapter.find_adapter(tx) is not None:
        return torch_adapter.to_state_dict(tx, opt_state, params, step)
    spec, path = find_optimizer(tx)
    sub = get_substate(opt_state, path)
    if isinstance(step, Tensor):
        step = int(step.item())
    if not params:  # torch.optim cannot be built without parameters
        return {"state": {}, "param_groups": []}
    # torch writes the param_groups (its flags, their order) itself: build the optimizer
    # over the params (no state is allocated) and take its state_dict.
    sd = torch_optimizer(tx, params, step=step).state_dict()
    take = torch.clone if copy else _same
    state: dict[int, dict[str, Tensor]] = {}
    names = _flat_names(spec.groups(list(params)))
    if spec.is_adam:
        if not isinstance(sub, AdamState):
            raise ConfigError(f"expected an AdamState for {spec.name}, got {type(sub).__name__}")
        for idx, name in enumerate(names):
            if float(sub.step[name]) == 0:
                continue
            entry = {
                "step": sub.step[name].clone(),
                "exp_avg": take(sub.exp_avg[name]),
                "exp_avg_sq": take(sub.exp_avg_sq[name]),
            }
            if spec.amsgrad:
                entry["max_exp_avg_sq"] = take(sub.max_exp_avg_sq[name])
            state[idx] = entry
    else:
        if not isinstance(sub, SGDState):
            raise ConfigError(f"expected an SGDState for sgd, got {type(sub).__name__}")
        if spec.momentum != 0:
            flags = sub.initialized.tolist()
            position = {n: i for i, n in enumerate(params)}
            for idx, name in enumerate(names):
                if flags[position[name]] != 0:
                    state[idx] = {"momentum_buffer": take(sub.momentum_buffer[name])}
    sd["state"] = state
    return sd


def names_by_index(
    torch_groups: list, indices: list[int], names: list[str]
) -> dict[int, str] | None:
    """Match a torch state dict's parameter indices to names through its ``param_names``.

    Args:
        torch_groups: the state dict's ``param_groups``.
        indices: their parameter indices, in group order.
        names: the trainable parameter names the state dict must hold.

    Returns:
        index -> name when every group carries ``param_names`` (torch >= 2.6 writes them),
        else None (match by position instead).

    Raises:
        ConfigError: the names differ from ``names`` (the message lists some of each).
    """
    if not all("param_names" in g for g in torch_groups):
        return None
    sd_names = [n for g in torch_groups for n in g["param_names"]]
    missing = [n for n in names if n not in set(sd_names)]
    unexpected = [n for n in sd_names if n not in set(names)]
    if missing or unexpected:
        raise ConfigError(
            f"the torch state_dict's param_names differ from the model's trainable "
            f"parameters: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    return dict(zip(indices, sd_names))


def _index_to_name(spec: OptimizerSpec, param_groups_sd: list, params: Params) -> dict[int, str]:
    """Map a torch state dict's parameter indices to medfunc parameter names."""
    names = list(params)
    torch_groups = []
    for i, g in enumerate(param_groups_sd):
        if not isinstance(g, Mapping) or "params" not in g:
            raise ConfigError(f"state_dict param_groups[{i}] has no 'params' list")
        torch_groups.append(g)
    indices = [int(i) for g in torch_groups for i in g["params"]]
    if len(indices) != len(names):
        raise ConfigError(
            f"the torch state_dict holds {len(indices)} parameters but the model has "
            f"{len(names)} trainable parameters; it belongs to a different model or a different "
            "set of frozen parameters"
        )
    if len(set(indices)) != len(indices):
        raise ConfigError("the torch state_dict lists a parameter index in two param_groups")
    by_name = names_by_index(torch_groups, indices, names)
    if by_name is not None:
        return by_name
    ours = spec.groups(names)
    if len(torch_groups) == 1:
        order = names  # one group: torch numbered the params in model order
    elif [len(g["params"]) for g in torch_groups] == [len(g.names) for g in ours]:
        order = _flat_names(ours)  # built like torch_param_groups
    else:
        raise ConfigError(
            f"cannot match the torch state_dict's {len(torch_groups)} param_groups (sizes "
            f"{[len(g['params']) for g in torch_groups]}) to this optimizer's groups (sizes "
            f"{[len(g.names) for g in ours]}) without 'param_names'; build the torch optimizer "
            "with medfunc.optim.torch_param_groups (named parameters)"
        )
    return dict(zip(indices, order))


def _copy_into(dst: Tensor, src: Any, what: str) -> None:
    if not isinstance(src, Tensor):
        raise ConfigError(f"{what} must be a tensor, got {type(src).__name__}")
    if src.shape != dst.shape:
        raise ConfigError(
            f"{what} has shape {tuple(src.shape)} but the parameter has shape "
            f"{tuple(dst.shape)}; the state_dict belongs to a different model"
        )
    dst.copy_(src)


def _adoptable(src: Tensor, param: Tensor, adopted: set[int]) -> bool:
    """Whether ``src`` can be the state's tensor itself: laid out as ``zeros_like(param)``
    would be, alone in its storage, and not taken for another entry already."""
    storage = src.untyped_storage()
    return (
        src.dtype == param.dtype
        and src.device == param.device
        and src.shape == param.shape
        and src.is_contiguous()
        and param.is_contiguous()
        and src.storage_offset() == 0
        and storage.nbytes() == src.numel() * src.element_size()
        and storage.data_ptr() not in adopted
    )


class _Placer:
    """Puts a state dict's tensors into the optimizer state: copies into the tensors
    ``tx.init`` allocated, or (``adopt``) the state dict's tensors themselves where they fit."""

    def __init__(self, adopt: bool) -> None:
        self.adopt = adopt
        self.adopted: set[int] = set()

    def __call__(
        self, entries: dict[str, Tensor], name: str, src: Any, param: Tensor, what: str
    ) -> None:
        """Set ``entries[name]`` to the value ``src`` (checked against ``param``'s shape)."""
        if self.adopt and isinstance(src, Tensor) and _adoptable(src, param, self.adopted):
            if src.numel():
                self.adopted.add(src.untyped_storage().data_ptr())
            entries[name] = src
            return
        if self.adopt:  # the template holds no memory: allocate the moment now
            entries[name] = torch.zeros_like(param, memory_format=torch.preserve_format)
        _copy_into(entries[name], src, what)

    def fill_missing(self, entries: dict[str, Tensor], params: Params) -> None:
        """Give every parameter without a state dict entry its zero buffer (``adopt`` only)."""
        if not self.adopt:
            return
        for name, template in entries.items():
            if template.numel() == 0 and params[name].numel() != 0:
                entries[name] = torch.zeros_like(params[name], memory_format=torch.preserve_format)


def _optimizer_tx(tx: GradientTransformation, path: tuple[int, ...]) -> GradientTransformation:
    for i in path:
        tx = tx.children[i]
    return tx


def _init_around(
    tx: GradientTransformation, path: tuple[int, ...], params: Params, sub: OptState
) -> OptState:
    """``tx.init(params)`` with ``sub`` as the optimizer's state at ``path`` (not initialised:
    a :func:`chain`'s state is the tuple of its members' states)."""
    if not path:
        return sub
    return tuple(
        _init_around(child, path[1:], params, sub) if i == path[0] else child.init(params)
        for i, child in enumerate(tx.children)
    )


def _empty_like_params(params: Params) -> Params:
    """Zero-size stand-ins of the params (same names, dtypes, devices and ranks): ``init`` of
    them gives the optimizer state's layout without allocating its buffers."""
    return type(params)((n, p.new_empty((0,) * p.dim())) for n, p in params.items())


def from_torch_state_dict(
    tx: GradientTransformation,
    state_dict: Mapping[str, Any],
    params: Params,
    *,
    copy: bool = True,
) -> OptState:
    """Build the state of ``tx`` from a ``torch.optim`` ``state_dict()``.

    Parameters are matched by ``param_names`` when the groups carry them, otherwise by index: a
    single-group torch optimizer numbers parameters in model order, a multi-group one must be
    grouped like :func:`torch_param_groups`. Hyperparameters come from ``tx``, not from the
    state dict. The other parts of a chain start from ``tx.init(params)``. A parameter without
    an entry (torch created none: it never had a gradient) keeps no state, as in torch.

    Args:
        tx: the optimizer, or a chain holding one.
        state_dict: ``torch.optim.AdamW/Adam/SGD(...).state_dict()`` (possibly loaded from disk).
        params: the trainable params, name -> tensor in model order.
        copy: with False the state dict's moments and momentum buffers become the state's own
            tensors wherever they have the dtype, device and layout ``tx.init(params)`` gives
            (no buffer is allocated for them, nothing is copied); the others are copied. For a
            state dict nothing else uses, e.g. one just read from a checkpoint.

    Returns:
        The optimizer state (dtype and device as ``tx.init(params)`` makes them).

    Raises:
        ConfigError: the state dict does not fit: another optimizer type, a different number of
            parameters, other names, wrong shapes or missing entries (the message names them).

    Example:
        >>> from collections import OrderedDict
        >>> model = torch.nn.Linear(4, 2)
        >>> params = OrderedDict(model.named_parameters())
        >>> tx = mf.optim.sgd(0.1, momentum=0.9)
        >>> torch_opt = mf.optim.torch_optimizer(tx, params)
        >>> model(torch.randn(8, 4)).sum().backward()
        >>> torch_opt.step()
        >>> opt_state = from_torch_state_dict(tx, torch_opt.state_dict(), params)
        >>> type(opt_state).__name__
        'SGDState'
    """
    _check_params(params, "from_torch_state_dict")
    if torch_adapter.find_adapter(tx) is not None:
        return torch_adapter.from_state_dict(tx, state_dict, params)
    if not isinstance(state_dict, Mapping) or not {"state", "param_groups"} <= set(state_dict):
        raise ConfigError(
            "expected a torch.optim state_dict with 'state' and 'param_groups' entries, got "
            f"{sorted(state_dict) if isinstance(state_dict, Mapping) else type(state_dict)}"
        )
    spec, path = find_optimizer(tx)
    if copy:
        full = tx.init(params)
        sub = get_substate(full, path)
    else:
        sub = _optimizer_tx(tx, path).init(_empty_like_params(params))
    place = _Placer(adopt=not copy)
    groups_sd = list(state_dict["param_groups"])
    family = "momentum" if not spec.is_adam else "betas"
    for g in groups_sd:
        if isinstance(g, Mapping) and family not in g and ("betas" in g or "momentum" in g):
            other = "an Adam-type" if "betas" in g else "an SGD"
            raise ConfigError(
                f"the state_dict is from {other} optimizer but the transformation is {spec.name}"
            )
    index_to_name = _index_to_name(spec, groups_sd, params)
    torch_state = {int(k): v for k, v in state_dict["state"].items()}
    unknown = sorted(set(torch_state) - set(index_to_name))
    if unknown:
        raise ConfigError(f"the state_dict has state for unknown parameter indices {unknown}")
    if spec.is_adam:
        keys = ["exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if spec.amsgrad else [])
        for idx, name in index_to_name.items():
            entry = torch_state.get(idx)
            if not entry:
                continue
            missing = [k for k in ["step", *keys] if k not in entry]
            if missing:
                raise ConfigError(
                    f"state of parameter {idx} ({name!r}) lacks {missing}"
                    + (
                        " (was it trained with amsgrad=False?)"
                        if "max_exp_avg_sq" in missing
                        else ""
                    )
                )
            sub.step[name].fill_(float(entry["step"]))
            for k in keys:
                place(
                    getattr(sub, k), name, entry[k], params[name], f"state[{idx}][{k!r}] ({name!r})"
                )
        for k in keys:
            place.fill_missing(getattr(sub, k), params)
    else:
        have = {
            idx: e.get("momentum_buffer")
            for idx, e in torch_state.items()
            if isinstance(e, Mapping) and e.get("momentum_buffer") is not None
        }
        if spec.momentum != 0:  # torch keeps no state without momentum
            position = {n: i for i, n in enumerate(params)}
            for idx, buffer in have.items():
                name = index_to_name[idx]
                place(
                    sub.momentum_buffer,
                    name,
                    buffer,
                    params[name],
                    f"state[{idx}]['momentum_buffer'] ({name!r})",
                )
                sub.initialized[position[name]] = 1.0
            place.fill_missing(sub.momentum_buffer, params)
    if copy:
        return replace_substate(full, path, sub)
    return _init_around(tx, path, params, sub)


__all__ = [
    "from_torch_state_dict",
    "to_torch_state_dict",
    "torch_kernel_flags",
    "torch_optimizer",
    "torch_param_groups",
]
