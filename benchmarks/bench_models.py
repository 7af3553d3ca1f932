"""The step-throughput benchmark's models: a tiny MLP, a BERT-shaped classifier built from fused
SDPA blocks, and (from ``transformers``) BERT and GPT-2; sizes scaled down on the CPU."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812


class MLP(nn.Module):
    """A small classifier: 30 features -> 128 -> 128 -> 2, ReLU, dropout 0.1."""

    def __init__(self, features: int = 30, hidden: int = 128, classes: int = 2) -> None:
        super().__init__()
        self.fc1 = nn.Linear(features, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, classes)
        self.drop = nn.Dropout(0.1)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.drop(F.relu(self.fc1(x)))
        logits = self.head(F.relu(self.fc2(h)))
        return {"loss": F.cross_entropy(logits, labels), "logits": logits}


class SdpaBlock(nn.Module):
    """A post-norm transformer encoder block (BERT's layout) with fused SDPA attention."""

    def __init__(self, dim: int, heads: int, ffn: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.attn_norm = nn.LayerNorm(dim, eps=1e-12)
        self.ffn_in = nn.Linear(dim, ffn)
        self.ffn_out = nn.Linear(ffn, dim)
        self.ffn_norm = nn.LayerNorm(dim, eps=1e-12)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0
        )
        x = self.attn_norm(x + self.drop(self.proj(a.transpose(1, 2).reshape(b, t, d))))
        return self.ffn_norm(x + self.drop(self.ffn_out(F.gelu(self.ffn_in(x)))))


class SdpaBert(nn.Module):
    """A BERT-shaped sequence classifier built from :class:`SdpaBlock` (no Hugging Face)."""

    def __init__(
        self,
        vocab: int,
        dim: int,
        layers: int,
        heads: int,
        ffn: int,
        max_len: int = 512,
        classes: int = 2,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(max_len, dim)
        self.emb_norm = nn.LayerNorm(dim, eps=1e-12)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(SdpaBlock(dim, heads, ffn, dropout) for _ in range(layers))
        self.pooler = nn.Linear(dim, dim)
        self.classifier = nn.Linear(dim, classes)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.drop(self.emb_norm(self.tok(input_ids) + self.pos(positions)))
        mask = attention_mask[:, None, None, :].bool()
        for block in self.blocks:
            x = block(x, mask)
        logits = self.classifier(self.drop(torch.tanh(self.pooler(x[:, 0]))))
        return {"loss": F.cross_entropy(logits.float(), labels), "logits": logits}


@dataclass
class ModelSpec:
    """One benchmark model: how to build it, its batch, precision and peak LR."""

    name: str
    build: Callable[[], nn.Module]
    batch: Callable[[torch.device], dict[str, torch.Tensor]]
    precision: str
    lr: float
    shape: str
    tokens: int
    notes: list[str] = field(default_factory=list)


def _text_batch(
    batch_size: int, seq: int, vocab: int, classes: int | None
) -> Callable[[torch.device], dict[str, torch.Tensor]]:
    def make(device: torch.device) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, vocab, (batch_size, seq), generator=g)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        batch["labels"] = (
            torch.randint(0, classes, (batch_size,), generator=g) if classes else ids.clone()
        )
        return {k: v.to(device) for k, v in batch.items()}

    return make


def model_specs(device: torch.device) -> dict[str, ModelSpec]:
    """The benchmark models; transformer sizes are scaled down on the CPU."""
    cuda = device.type == "cuda"
    low = "bf16" if cuda else "fp32"
    specs: dict[str, ModelSpec] = {}

    def mlp_batch(dev: torch.device) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(0)
        return {
            "x": torch.randn(64, 30, generator=g).to(dev),
            "labels": torch.randint(0, 2, (64,), generator=g).to(dev),
        }

    specs["mlp"] = ModelSpec("mlp", MLP, mlp_batch, "fp32", 1e-3, "64 x 30, fp32", 64)

    def wide_batch(dev: torch.device) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(0)
        return {
            "x": torch.randn(32, 64, generator=g).to(dev),
            "labels": torch.randint(0, 4, (32,), generator=g).to(dev),
        }

    specs["mlp-wide"] = ModelSpec(
        "mlp-wide",
        lambda: MLP(features=64, hidden=256, classes=4),
        wide_batch,
        "fp32",
        1e-3,
        "32 x 64, fp32 (64 -> 256 -> 256 -> 4)",
        32,
    )

    if cuda:
        bert = {"dim": 768, "layers": 12, "heads": 12, "ffn": 3072}
        bsz, seq, bert_note = 32, 128, []
    else:
        bert = {"dim": 256, "layers": 4, "heads": 4, "ffn": 1024}
        bsz, seq = 8, 128
        bert_note = ["CPU: scaled down to 4 layers x 256 hidden, batch 8 x 128"]
    shape = f"{bsz} x {seq}, {low}"

    def bert_hf() -> nn.Module:
        from transformers import BertConfig, BertForSequenceClassification

        config = BertConfig(
            hidden_size=bert["dim"],
            num_hidden_layers=bert["layers"],
            num_attention_heads=bert["heads"],
            intermediate_size=bert["ffn"],
            num_labels=2,
        )
        return BertForSequenceClassification(config)

    def bert_sdpa() -> nn.Module:
        return SdpaBert(30522, bert["dim"], bert["layers"], bert["heads"], bert["ffn"])

    for name, build in (("bert-hf", bert_hf), ("bert-sdpa", bert_sdpa)):
        specs[name] = ModelSpec(
            name,
            build,
            _text_batch(bsz, seq, 30522, 2),
            low,
            5e-5,
            shape,
            bsz * seq,
            list(bert_note),
        )

    if cuda:
        gpt = {"n_layer": 12, "n_embd": 768, "n_head": 12}
        gbsz, gseq, gpt_note = 16, 1024, []
    else:
        gpt = {"n_layer": 2, "n_embd": 256, "n_head": 4}
        gbsz, gseq = 2, 256
        gpt_note = ["CPU: scaled down to 2 layers x 256 hidden, batch 2 x 256"]

    def gpt2() -> nn.Module:
        from transformers import GPT2Config, GPT2LMHeadModel

        return GPT2LMHeadModel(GPT2Config(n_positions=max(gseq, 1024), **gpt))

    specs["gpt2"] = ModelSpec(
        "gpt2",
        gpt2,
        _text_batch(gbsz, gseq, 50257, None),
        low,
        6e-4,
        f"{gbsz} x {gseq}, {low}",
        gbsz * gseq,
        list(gpt_note),
    )
    return specs


def expand_models(names: str) -> list[str]:
    """``mlp,bert,gpt2`` -> model keys (``bert`` stands for both BERT variants)."""
    out: list[str] = []
    for name in filter(None, (n.strip() for n in names.split(","))):
        out.extend(["bert-hf", "bert-sdpa"] if name == "bert" else [name])
    return out
