"""Optimizer configuration: validation errors, masks, multipliers, grouping, state structure."""

from __future__ import annotations

import re
from collections import OrderedDict
from pathlib import Path

import optree
import pytest
import torch
from torch import nn

from medfunc.errors import ConfigError
from medfunc.optim import (
    AdamState,
    GradientTransformation,
    SGDState,
    UpdateContext,
    adam,
    adamw,
    chain,
    clip_by_global_norm,
    clip_by_value,
    default_decay_mask,
    find_optimizer,
    get_optimizer,
    param_groups,
    sgd,
)


def small_params() -> OrderedDict:
    torch.manual_seed(0)
    model = nn.Sequential(
        OrderedDict(fc1=nn.Linear(4, 8), ln_f=nn.LayerNorm(8), head=nn.Linear(8, 2))
    )
    return OrderedDict((n, p.detach().clone()) for n, p in model.named_parameters())


BETAS = re.escape("betas must be a pair of numbers in [0, 1), e.g. (0.9, 0.999)")
TX_ERROR = r"chain\(\) must be a .*GradientTransformation.*; got a function"
MULTS = r"lr_multipliers must be a list of \(name substring, LR multiplier\) pairs with .* >= 0.*"


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: adamw(-1e-3), "lr must be a finite number >= 0; got -0.001"),
        (lambda: adamw(float("nan")), "lr must be a finite number >= 0; got nan"),
        (lambda: adamw("1e-3"), "lr must be a finite number >= 0; got '1e-3'"),
        (lambda: adamw(torch.tensor(1e-3)), "got a Tensor"),
        (lambda: adamw(1e-3, betas=(1.0, 0.999)), rf"{BETAS}; got \(1.0, 0.999\)"),
        (lambda: adam(1e-3, betas=(0.9, -0.1)), rf"{BETAS}; got \(0.9, -0.1\)"),
        (lambda: adamw(1e-3, betas=0.9), rf"{BETAS}; got 0.9"),
        (lambda: adamw(1e-3, eps=-1e-8), "eps must be a finite number >= 0; got -1e-08"),
        (lambda: adamw(1e-3, weight_decay=-0.1), "weight_decay must be a finite .* >= 0; got -0.1"),
        (lambda: adamw(1e-3, amsgrad=1), "amsgrad must be true or false; got 1"),
        (lambda: sgd(0.1, momentum=-0.9), "momentum must be a finite number >= 0; got -0.9"),
        (lambda: sgd(0.1, nesterov=True), "nesterov=True needs momentum > 0.*momentum=0.0"),
        (lambda: sgd(0.1, 0.9, dampening=0.1, nesterov=True), "dampening=0.1"),
        (lambda: adamw(1e-3, kernel="cuda"), "kernel must be one of 'auto', .*'fused'; got 'cuda'"),
        (lambda: adamw(1e-3, decay_mask="bias"), "decay_mask must be .*; got 'bias'; wrap one"),
        (lambda: adamw(1e-3, decay_mask=[]), r"decay_mask must be .*non-empty list.*; got \[\]"),
        (
            lambda: adamw(1e-3, lr_multipliers=[("head", -1.0)]),
            rf"{MULTS}; got \[\('head', -1.0\)\]",
        ),
        (lambda: adamw(1e-3, lr_multipliers=[("head",)]), rf"{MULTS}; got \[\('head',\)\]"),
        (lambda: clip_by_global_norm(0.0), "max_norm must be a finite number > 0; got 0.0"),
        (lambda: clip_by_value(-1), "max_value must be a finite number > 0; got -1"),
        (lambda: chain(adamw(1e-3), lambda g: g), TX_ERROR),
    ],
)
def test_invalid_config_raises_config_error_naming_the_value(make, match):
    with pytest.raises(ConfigError, match=match):
        make()


def test_config_error_is_a_value_error():
    with pytest.raises(ValueError):
        sgd(-1.0)


def test_get_optimizer():
    assert get_optimizer("AdamW", lr=1e-3).spec.name == "adamw"
    assert get_optimizer("sgd", lr=0.1, momentum=0.9).spec.momentum == 0.9
    with pytest.raises(
        ConfigError, match=r"optimizer must be one of 'adamw', 'adam', 'sgd'; got 'lamb'"
    ):
        get_optimizer("lamb", lr=1e-3)
    with pytest.raises(ConfigError, match="optimizer 'sgd' got an unexpected argument 'betas'"):
        get_optimizer("sgd", lr=0.1, betas=(0.9, 0.99))


@pytest.mark.parametrize(
    ("name", "decays"),
    [
        ("fc.weight", True),
        ("fc.bias", False),
        ("encoder.layer.0.attention.output.LayerNorm.weight", False),
        ("features.norm5.weight", False),
        ("blocks.0.norm1.weight", False),
        ("h.0.ln_1.weight", False),
        ("transformer.ln_f.weight", False),
        ("blocks.3.ln2.weight", False),
        ("ln.weight", False),
        ("relative_position_bias_table", False),
        ("conv.kernel", True),  # "ln" inside "kernel" is not a LayerNorm
        ("lnk.weight", True),
        ("unlearned.weight", True),
        ("BatchNorm.weight", True),  # case-sensitive: "Norm" is not "norm"
    ],
)
def test_default_decay_mask(name, decays):
    assert default_decay_mask(name) is decays


def test_param_groups_order_masks_and_multipliers():
    names = ["fc1.weight", "fc1.bias", "ln_f.weight", "ln_f.bias", "head.weight", "head.bias"]
    groups = param_groups(names, 0.1, "default", [("head", 10.0), ("fc1", 0.5)])
    assert [(g.names, g.lr_multiplier, g.weight_decay) for g in groups] == [
        (("fc1.weight",), 0.5, 0.1),
        (("fc1.bias",), 0.5, 0.0),
        (("ln_f.weight", "ln_f.bias"), 1.0, 0.0),
        (("head.weight",), 10.0, 0.1),
        (("head.bias",), 10.0, 0.0),
    ]
    # first match wins; None decays everything; zero weight decay needs no mask
    groups = param_groups(names, 0.1, None, [("head.b", 2.0), ("head", 3.0)])
    assert [(len(g.names), g.lr_multiplier) for g in groups] == [(4, 1.0), (1, 3.0), (1, 2.0)]
    assert len(param_groups(names, 0.0, "default", None)) == 1
    as_dict = param_groups(names, 0.0, None, {"head.b": 2.0, "head": 3.0})
    assert [(len(g.names), g.lr_multiplier) for g in as_dict] == [(4, 1.0), (1, 3.0), (1, 2.0)]
    groups = param_groups(names, 0.1, ["ln_f", "bias"], None)
    assert groups[0].names == ("fc1.weight", "head.weight")


def test_patterns_naming_no_parameter_raise_at_init():
    params = small_params()
    tx = adamw(1e-3, decay_mask=["LayerNorm", "bias_"])  # building it is fine ...
    with pytest.raises(
        ConfigError,
        match=r"decay_mask substrings \['LayerNorm', 'bias_'\] "
        "match no trainable parameter",
    ):
        tx.init(params)  # ... the names are only known at init
    with pytest.warns(UserWarning, match=r"\['LayerNorm'\] match no trainable parameter"):
        adamw(1e-3, decay_mask=["LayerNorm", "bias"]).init(params)
    with pytest.raises(ConfigError, match=r"lr_multipliers patterns \['classifier'\] match no"):
        sgd(0.1, lr_multipliers=[("head", 2.0), ("classifier", 10.0)]).init(params)
    with pytest.raises(ConfigError, match="decay_mask callable must return a bool"):
        adamw(1e-3, decay_mask=lambda n: "yes").init(params)


def test_init_and_update_check_inputs():
    params = small_params()
    with pytest.raises(ConfigError, match="expects an OrderedDict"):
        adamw(1e-3).init(dict(params))
    tx = adamw(1e-3)
    state = tx.init(params)
    grads = OrderedDict((n, torch.zeros_like(p)) for n, p in params.items())
    del grads["head.bias"]
    with pytest.raises(ConfigError, match=r"grads keys differ .*missing \['head.bias'\]"):
        tx.update(grads, state, params, UpdateContext(step=torch.tensor(0)))


def test_state_structure_is_an_ordered_checkpointable_pytree():
    params = small_params()
    state = chain(clip_by_global_norm(1.0), adamw(1e-3, amsgrad=True)).init(params)
    leaves, treedef = optree.tree_flatten(state, namespace="medfunc")
    assert all(isinstance(x, torch.Tensor) for x in leaves)
    assert len(leaves) == 4 * len(params)
    assert isinstance(state[1], AdamState)
    assert list(state[1].exp_avg) == list(params)  # model order kept (OrderedDict)
    assert all(s.dtype == torch.float32 and s.ndim == 0 for s in state[1].step.values())
    rebuilt = optree.tree_unflatten(treedef, [x.clone() for x in leaves])
    assert isinstance(rebuilt[1], AdamState) and list(rebuilt[1].exp_avg) == list(params)
    sgd_state = sgd(0.1).init(params)
    assert isinstance(sgd_state, SGDState) and sgd_state.momentum_buffer == OrderedDict()
    assert len(optree.tree_leaves(sgd(0.1, momentum=0.9).init(params))) == len(params) + 1


def test_transformation_metadata_for_interop():
    tx = chain(clip_by_value(1.0), chain(clip_by_global_norm(1.0), sgd(0.1, momentum=0.9)))
    assert isinstance(tx, GradientTransformation) and len(tx.children) == 2
    spec, path = find_optimizer(tx)
    assert (spec.name, spec.momentum, path) == ("sgd", 0.9, (1, 1))
    init, update = tx[:2]  # init and update stay the first two fields
    assert callable(init) and callable(update)
    with pytest.raises(ConfigError, match="found 2: adamw, sgd"):
        find_optimizer(chain(adamw(1e-3), sgd(0.1)))


# ----------------------------------------------------------------------------------------------
# docs/optimizers.md: the runnable examples run and print what the page says


def _doc_blocks() -> list[str]:
    text = (Path(__file__).resolve().parents[2] / "docs" / "optimizers.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    start = next(i for i, b in enumerate(blocks) if "torch.manual_seed(0)" in b)
    return [b for b in blocks[start:] if "params" in b and "def " not in b and "(lr," not in b]


def _expected(block: str) -> list[str]:
    out, lines = [], block.splitlines()
    for i, line in enumerate(lines):
        if line.lstrip().startswith("print("):
            if "#" in line:
                out.append(line.split("#", 1)[1].strip())
            else:
                j = i + 1
                while j < len(lines) and not lines[j].startswith("# "):
                    j += 1
                while j < len(lines) and lines[j].startswith("# "):
                    out.append(lines[j][2:].strip())
                    j += 1
    return out


def test_docs_examples_run_and_print_what_they_say(capsys):
    blocks = _doc_blocks()
    assert len(blocks) == 4
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "docs/optimizers.md", "exec"), namespace)
        printed = capsys.readouterr().out.strip().splitlines()
        expected = _expected(block)
        assert len(printed) == len(expected), (printed, expected)
        for got, want in zip(printed, expected):
            if want.endswith("..."):
                assert got.startswith(want[:-3].rstrip(" ,")), (got, want)
            else:
                assert got == want
