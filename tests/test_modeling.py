"""Model options: activation checkpointing, dropout override, channels_last."""

from __future__ import annotations

import copy
import pickle
import warnings
from collections import OrderedDict

import pytest
import torch
from conftest import tiny_bert
from torch import nn

import medfunc as mf
from medfunc.errors import ConfigError
from medfunc.modeling import (
    DEFAULT_RECOMPUTE_PATTERNS,
    HF_CHECKPOINTING,
    enable_activation_recompute,
    enable_gradient_checkpointing,
    is_checkpointed,
    prepare_model,
    set_dropout,
    to_channels_last,
)


class Block(nn.Module):
    """A pre-norm residual MLP block (optionally with BatchNorm, to exercise buffers)."""

    def __init__(self, dim: int, dropout: float = 0.1, batchnorm: bool = False) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(dim) if batchnorm else nn.LayerNorm(dim)
        self.up = nn.Linear(dim, 4 * dim)
        self.drop = nn.Dropout(dropout)
        self.down = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(self.drop(nn.functional.gelu(self.up(self.norm(x)))))


class DeepMLP(nn.Module):
    """``depth`` residual blocks in a ModuleList and a classifier; returns {"loss", "logits"}."""

    def __init__(
        self, dim: int = 16, depth: int = 4, dropout: float = 0.1, batchnorm: bool = False
    ) -> None:
        super().__init__()
        self.inp = nn.Linear(6, dim)
        self.blocks = nn.ModuleList(Block(dim, dropout, batchnorm) for _ in range(depth))
        self.head = nn.Linear(dim, 3)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        h = self.inp(x)
        for block in self.blocks:
            h = block(h)
        out = {"logits": self.head(h)}
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(out["logits"], labels)
        return out


class Encoder(nn.Module):
    def __init__(self, dim: int = 16, depth: int = 2, dropout: float = 0.1) -> None:
        super().__init__()
        self.inp = nn.Linear(6, dim)
        layer = nn.TransformerEncoderLayer(dim, 2, 32, dropout=dropout, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.head = nn.Linear(dim, 3)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        out = {"logits": self.head(self.encoder(self.inp(x)).mean(1))}
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(out["logits"], labels)
        return out


def twins(make, **kwargs) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    plain = make(**kwargs)
    return plain, copy.deepcopy(plain)


def shifted_params(model: nn.Module, scale: float = 0.05) -> OrderedDict:
    """Parameters that differ from the module's own weights (like a state after pure steps)."""
    g = torch.Generator().manual_seed(3)
    return OrderedDict(
        (n, (p.detach() + scale * torch.randn(p.shape, generator=g)).requires_grad_(True))
        for n, p in model.named_parameters()
    )


def functional_grads(model: nn.Module, params: OrderedDict, buffers: OrderedDict, batch: dict):
    """Gradients the way train_step takes them: functional_call, then autograd.grad outside it."""
    model.train()
    with torch.random.fork_rng():
        torch.manual_seed(1234)
        out = torch.func.functional_call(model, (params, buffers), (), batch)
        loss = out["loss"] if isinstance(out, dict) else out.loss
        return torch.autograd.grad(loss, list(params.values()), allow_unused=True)


def assert_grads_close(a, b, atol: float = 1e-6) -> None:
    for ga, gb in zip(a, b):
        if ga is None or gb is None:
            assert ga is None and gb is None
            continue
        assert (ga - gb).abs().max() <= atol


def mlp_batch(n: int = 8, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(n, 6, generator=g), "labels": torch.randint(0, 3, (n,), generator=g)}


# ----------------------------------------------------------------------------------------------
# Activation checkpointing
# ----------------------------------------------------------------------------------------------


def test_default_rule_wraps_the_repeated_blocks_without_changing_keys():
    model = Encoder(depth=3)
    keys = list(model.state_dict())
    names = enable_gradient_checkpointing(model)
    assert names == ["encoder.layers.0", "encoder.layers.1", "encoder.layers.2"]
    assert list(model.state_dict()) == keys
    assert all(is_checkpointed(layer) for layer in model.encoder.layers)
    assert not is_checkpointed(model.encoder.layers[0].self_attn)  # nested: not wrapped again
    forwards = [layer.forward for layer in model.encoder.layers]

    assert enable_gradient_checkpointing(model) == names  # idempotent
    assert [layer.forward for layer in model.encoder.layers] == forwards
    assert not isinstance(forwards[0].original, type(forwards[0]))  # no double wrap
    assert list(model.state_dict()) == keys

    mlp = DeepMLP(depth=2)
    assert enable_gradient_checkpointing(mlp) == ["blocks.0", "blocks.1"]


def test_patterns_choose_blocks_by_name_or_class():
    model = DeepMLP(depth=4)
    assert enable_gradient_checkpointing(model, ["blocks.1", "blocks.3"]) == [
        "blocks.1",
        "blocks.3",
    ]
    assert not is_checkpointed(model.blocks[0])
    assert enable_gradient_checkpointing(DeepMLP(depth=2), "Block") == ["blocks.0", "blocks.1"]
    with pytest.raises(ConfigError, match=r"no submodule.*top-level children are \['inp'"):
        enable_gradient_checkpointing(DeepMLP(depth=2), ["decoder.*"])


class FlaggedNet(nn.Module):
    """No blocks medfunc recognises and no Hugging Face API: a model whose own code reads a
    ``gradient_checkpointing`` flag (as the original trainer's attribute toggle expects)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(2, 4)
        self.core = nn.Linear(4, 4)
        self.core.gradient_checkpointing = False
        self.gradient_checkpointing = False


def test_without_api_or_blocks_the_flag_is_set_with_a_warning():
    model = FlaggedNet()
    with pytest.warns(
        UserWarning, match=r"set gradient_checkpointing=True on \['<model>', 'core'\]"
    ):
        assert enable_gradient_checkpointing(model) == ["", "core"]
    assert model.gradient_checkpointing is True and model.core.gradient_checkpointing is True
    assert not hasattr(model.inp, "gradient_checkpointing")
    assert not any(is_checkpointed(m) for m in model.modules())
    plain = nn.Sequential(nn.Linear(2, 2), nn.ReLU())  # no flag anywhere: nothing, no error
    with pytest.warns(UserWarning, match="nothing was changed"):
        assert prepare_model(plain, gradient_checkpointing=True) is plain
    assert not hasattr(plain, "gradient_checkpointing")


@pytest.mark.parametrize("make", [DeepMLP, Encoder], ids=["mlp", "transformer"])
def test_checkpointed_gradients_equal_plain_under_functional_call(make):
    plain, ckpt = twins(make, dropout=0.1)  # dropout: checkpoint must replay the same masks
    enable_gradient_checkpointing(ckpt)
    # The parameters passed to functional_call differ from the modules' own weights, as after a
    # pure train_step: the recomputation must use the former.
    params = shifted_params(plain)
    buffers = OrderedDict(plain.named_buffers())
    batch = {"x": torch.randn(4, 5, 6), "labels": torch.tensor([0, 1, 2, 0])}
    if make is DeepMLP:
        batch = mlp_batch()
    assert_grads_close(
        functional_grads(plain, params, buffers, batch),
        functional_grads(ckpt, params, buffers, batch),
    )


class AttentionNet(nn.Module):
    """A top-level child named ``attention`` and a nested ``encoder.conv3d`` (the original's
    default patterns), plus modules no pattern names."""

    def __init__(self, dropout: float = 0.1) -> None:
        super().__init__()
        self.inp = nn.Linear(6, 8)
        self.attention = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Dropout(dropout))
        self.encoder = nn.Module()
        self.encoder.conv3d = nn.Conv3d(1, 2, kernel_size=(1, 1, 3), padding=(0, 0, 1))
        self.encoder.attention_norm = nn.LayerNorm(64)
        self.head = nn.Linear(64, 3)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        h = self.attention(self.inp(x)).view(x.shape[0], 1, 1, 1, 32)
        h = self.encoder.conv3d(h).flatten(1)
        out = {"logits": self.head(self.encoder.attention_norm(h))}
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(out["logits"], labels)
        return out


def test_activation_recompute_wraps_matching_names_top_level_included():
    model = AttentionNet()
    keys = list(model.state_dict())
    assert DEFAULT_RECOMPUTE_PATTERNS == ("attention", "conv3d")
    names = enable_activation_recompute(model)
    # "attention" is a top-level child (the original never wrapped one); the Linear inside it
    # is not wrapped again; every module whose name contains a pattern is.
    assert names == ["attention", "encoder.conv3d", "encoder.attention_norm"]
    assert is_checkpointed(model.attention) and not is_checkpointed(model.attention[0])
    assert not is_checkpointed(model.inp) and not is_checkpointed(model.head)
    assert list(model.state_dict()) == keys
    assert enable_activation_recompute(model) == names  # idempotent
    assert enable_activation_recompute(AttentionNet(), ["head"]) == ["head"]
    with pytest.warns(UserWarning, match=r"no submodule name .* contains any of \['decoder'\]"):
        assert enable_activation_recompute(AttentionNet(), ["decoder"]) == []
    with pytest.raises(ConfigError, match="activation_recompute_patterns"):
        enable_activation_recompute(AttentionNet(), [""])


def test_activation_recompute_inside_checkpointed_blocks_wraps_nothing_twice():
    model = Encoder(depth=2)
    enable_gradient_checkpointing(model)
    # every "self_attn" lies inside a checkpointed layer; "inp" is outside any
    assert enable_activation_recompute(model, ["self_attn", "inp"]) == ["inp"]
    assert not is_checkpointed(model.encoder.layers[0].self_attn)


def test_activation_recompute_gradients_equal_the_plain_model_bitwise():
    plain, ckpt = twins(AttentionNet, dropout=0.2)  # dropout masks must be replayed
    prepare_model(ckpt, activation_recompute=True)
    assert is_checkpointed(ckpt.attention) and is_checkpointed(ckpt.encoder.conv3d)
    params = shifted_params(plain)  # differ from the module's weights, as after pure steps
    buffers = OrderedDict(plain.named_buffers())
    grads = [functional_grads(m, params, buffers, mlp_batch()) for m in (plain, ckpt)]
    for a, b in zip(*grads):
        assert torch.equal(a, b)
    states = [mf.init_state(m, mf.optim.adamw(1e-2), seed=3) for m in (plain, ckpt)]
    for i in range(3):
        states = [mf.train_step(s, mlp_batch(seed=i))[0] for s in states]
    for name, value in states[0].params.items():
        assert torch.equal(value, states[1].params[name]), name


def test_activation_recompute_of_a_hugging_face_bert_trains_bitwise_equal():
    plain = tiny_bert(dropout=0.1)
    ckpt = copy.deepcopy(plain)
    names = enable_activation_recompute(ckpt)
    assert names == ["bert.encoder.layer.0.attention", "bert.encoder.layer.1.attention"]
    batch = {"input_ids": torch.randint(0, 40, (2, 8)), "labels": torch.tensor([0, 1])}
    states = [mf.init_state(m, mf.optim.adamw(1e-2), seed=1) for m in (plain, ckpt)]
    for _ in range(2):
        states = [mf.train_step(s, batch)[0] for s in states]
    for name, value in states[0].params.items():
        assert torch.equal(value, states[1].params[name]), name


def test_batchnorm_statistics_are_updated_once():
    plain, ckpt = twins(DeepMLP, dropout=0.0, batchnorm=True)
    enable_gradient_checkpointing(ckpt)
    params = shifted_params(plain)
    stats = [OrderedDict((n, b.clone()) for n, b in plain.named_buffers()) for _ in range(2)]
    grads = [functional_grads(m, params, s, mlp_batch()) for m, s in zip((plain, ckpt), stats)]
    assert_grads_close(*grads)
    for name, value in stats[0].items():
        assert torch.equal(value, stats[1][name]), name
    assert int(stats[1]["blocks.0.norm.num_batches_tracked"]) == 1


def test_checkpointed_train_step_matches_plain():
    plain, ckpt = twins(DeepMLP, dropout=0.1)
    enable_gradient_checkpointing(ckpt)
    states = [mf.init_state(m, mf.optim.sgd(0.1, momentum=0.9), seed=5) for m in (plain, ckpt)]
    for i in range(3):  # pure steps: from step 2 on the modules' own weights are stale
        batch = mlp_batch(seed=i)
        (states[0], m0), (states[1], m1) = (mf.train_step(s, batch) for s in states)
        assert abs(float(m0["grad_norm"]) - float(m1["grad_norm"])) <= 1e-6
        assert abs(float(m0["loss"]) - float(m1["loss"])) <= 1e-6
    for name, value in states[0].params.items():
        assert (value - states[1].params[name]).abs().max() <= 1e-6, name


def test_hugging_face_model_uses_its_own_api():
    plain = tiny_bert()
    ckpt = copy.deepcopy(plain)
    keys = list(ckpt.state_dict())
    assert enable_gradient_checkpointing(ckpt) == [HF_CHECKPOINTING]
    assert list(ckpt.state_dict()) == keys
    assert getattr(ckpt, "is_activation_checkpointing", None) or ckpt.is_gradient_checkpointing
    assert not any(is_checkpointed(m) for m in ckpt.modules())  # HF's mechanism, not ours

    batch = {"input_ids": torch.randint(0, 40, (2, 8)), "labels": torch.tensor([0, 2])}
    params = shifted_params(plain)
    buffers = OrderedDict(plain.named_buffers())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert_grads_close(
            functional_grads(plain, params, buffers, batch),
            functional_grads(ckpt, params, buffers, batch),
        )
        states = [mf.init_state(m, mf.optim.sgd(0.1), seed=1) for m in (plain, ckpt)]
        for _ in range(2):
            states = [mf.train_step(s, batch)[0] for s in states]
    for name, value in states[0].params.items():
        assert (value - states[1].params[name]).abs().max() <= 1e-6, name


def saved_activation_bytes(model: nn.Module, batch: dict) -> int:
    """Bytes of activations kept for the backward pass: tensors autograd saves outside any
    checkpointed region, plus the inputs each checkpointed block keeps for its recomputation
    (unique storages; parameters excluded)."""
    params = OrderedDict((n, p.detach().requires_grad_(True)) for n, p in model.named_parameters())
    param_storages = {p.untyped_storage().data_ptr() for p in params.values()}
    held: dict[int, int] = {}

    def keep(t: torch.Tensor) -> None:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in param_storages:
            held[ptr] = t.untyped_storage().nbytes()

    def pack(t: torch.Tensor) -> torch.Tensor:
        keep(t)
        return t

    def keep_inputs(_module: nn.Module, args: tuple) -> None:
        for a in args:
            keep(a)

    hooks = [
        m.register_forward_pre_hook(keep_inputs) for m in model.modules() if is_checkpointed(m)
    ]
    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = torch.func.functional_call(model, params, (), batch)
    torch.autograd.grad(out["loss"], list(params.values()))
    for hook in hooks:
        hook.remove()
    return sum(held.values())


def test_checkpointing_lowers_activation_memory():
    batch = {"x": torch.randn(64, 6), "labels": torch.randint(0, 3, (64,))}
    plain, ckpt = twins(DeepMLP, dim=64, depth=12, dropout=0.1)
    enable_gradient_checkpointing(ckpt)
    before, after = saved_activation_bytes(plain, batch), saved_activation_bytes(ckpt, batch)
    ratio = after / before
    print(f"deep MLP activation memory: {before} -> {after} bytes, ratio {ratio:.3f}")
    assert ratio < 0.5

    seq = {"x": torch.randn(8, 32, 6), "labels": torch.randint(0, 3, (8,))}
    plain, ckpt = twins(Encoder, dim=32, depth=6, dropout=0.1)
    enable_gradient_checkpointing(ckpt)
    before, after = saved_activation_bytes(plain, seq), saved_activation_bytes(ckpt, seq)
    print(f"transformer activation memory: {before} -> {after} bytes, ratio {after / before:.3f}")
    assert after / before < 0.5


def test_checkpointed_model_copies_and_exports(tmp_path):
    model = DeepMLP(depth=2)
    enable_gradient_checkpointing(model)
    clone = copy.deepcopy(model)
    assert clone.blocks[0].forward.module is clone.blocks[0]  # bound to the copy, not the original
    restored = pickle.loads(pickle.dumps(model))
    assert is_checkpointed(restored.blocks[1]) and restored.blocks[1].forward.module is not None
    x = torch.randn(5, 6)
    with torch.no_grad():
        assert torch.equal(restored.eval()(x)["logits"], model.eval()(x)["logits"])
    from medfunc.export import to_torchscript

    path = to_torchscript(model, {"x": torch.randn(3, 6)}, tmp_path / "m.pt")
    x = torch.randn(5, 6)
    with torch.no_grad():
        assert torch.allclose(torch.jit.load(str(path))(x=x)["logits"], model.eval()(x)["logits"])


# ----------------------------------------------------------------------------------------------
# Dropout
# ----------------------------------------------------------------------------------------------


class Droppy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = Encoder(dropout=0.3)
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.drop2d = nn.Dropout2d(0.2)
        self.alpha = nn.AlphaDropout(0.2)

    def forward(self, x: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
        spatial = self.drop2d(self.conv(img)).mean((1, 2, 3))
        return self.alpha(self.encoder(x)["logits"]) + spatial[:, None]


def test_set_dropout_overrides_every_dropout():
    model = Droppy()
    # 2 layers x (dropout, dropout1, dropout2, self_attn) + Dropout2d + AlphaDropout
    assert set_dropout(model, 0.25) == 10
    probs = [m.p for m in model.modules() if hasattr(m, "p")]
    probs += [m.dropout for m in model.modules() if isinstance(m, nn.MultiheadAttention)]
    assert len(probs) == 10 and set(probs) == {0.25}

    x, img = torch.randn(4, 5, 6), torch.randn(4, 1, 6, 6)
    set_dropout(model, 0.0)
    train_out = model.train()(x, img)  # grads on: no fast path, same kernels in both modes
    assert torch.equal(train_out, model.eval()(x, img))
    set_dropout(model, 0.5)
    assert not torch.allclose(model.train()(x, img), model.eval()(x, img))


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, "0.1", True, None])
def test_set_dropout_rejects_bad_probabilities(bad):
    with pytest.raises(ConfigError, match="0 <= p < 1"):
        set_dropout(nn.Dropout(), bad)


# ----------------------------------------------------------------------------------------------
# channels_last, prepare_model
# ----------------------------------------------------------------------------------------------


def cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3))


def test_channels_last_is_a_noop_on_cpu_with_one_warning():
    model = cnn()
    with pytest.warns(UserWarning, match="only benefits CUDA") as records:
        assert to_channels_last(model, "cpu") is False
    assert len(records) == 1
    assert model[0].weight.is_contiguous()
    assert not model[0].weight.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_channels_last_converts_on_cuda():
    model = cnn().cuda()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert to_channels_last(model) is True
    assert model[0].weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 16, 16, device="cuda").to(memory_format=torch.channels_last)
    reference = cnn()
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        out = model.eval()(x)
        expected = reference.cuda().eval()(x.contiguous())
    assert torch.allclose(out, expected, atol=1e-4)


def test_prepare_model_combines_the_options():
    model = DeepMLP(depth=2, dropout=0.3)
    keys = list(model.state_dict())
    assert prepare_model(model, gradient_checkpointing=True, dropout_prob=0.0) is model
    assert all(is_checkpointed(b) for b in model.blocks)
    assert all(b.drop.p == 0.0 for b in model.blocks)
    assert list(model.state_dict()) == keys
    assert is_checkpointed(
        prepare_model(DeepMLP(depth=2), gradient_checkpointing=["blocks.1"]).blocks[1]
    )
    with pytest.warns(UserWarning, match="only benefits CUDA"):
        prepare_model(cnn(), channels_last=True, device="cpu")
    with pytest.raises(ConfigError):
        prepare_model(DeepMLP(), dropout_prob=1.0)
