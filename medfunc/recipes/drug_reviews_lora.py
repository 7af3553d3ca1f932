"""The drug-review recipe as a LoRA fine-tune: low-rank adapters on a frozen MiniLM.

The data, the tokenisation and the classifier are those of :mod:`medfunc.recipes.drug_reviews`
(MiniLM with mean pooling and a linear two-class head). Instead of updating all 22.7M encoder
weights, ``peft`` freezes them and adds rank-``r`` adapters to the ``query`` and ``value``
projections of every attention layer; the new head is trained in full (``modules_to_save``).
The Trainer then keeps its checkpoints to the trainable parameters (``save_trainable_only``)
and saves the final model as the adapter (``PeftModel.save_pretrained``), which
:func:`load_adapter` puts back on a fresh base model.

Example::

    parts = build(max_train=64, max_eval=32)
    parts.model.print_trainable_parameters()   # trainable params: 74,498 || all params: ...
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch

from medfunc.errors import ConfigError
from medfunc.recipes import drug_reviews
from medfunc.recipes.base import RecipeParts

__all__ = ["TARGET_MODULES", "build", "load_adapter", "lora_config"]

#: The encoder's projections that get adapters (BERT attention's query and value).
TARGET_MODULES = ("query", "value")


def _peft() -> Any:
    try:
        import peft
    except ImportError as err:
        raise ConfigError(
            "the drug_reviews_lora recipe needs peft: run `pip install medfunc[text]`"
        ) from err
    return peft


def lora_config(rank: int = 8, alpha: int = 16, lora_dropout: float = 0.1) -> Any:
    """The recipe's ``peft.LoraConfig``: rank-``rank`` adapters on query and value, head trained.

    Args:
        rank: the adapters' rank ``r``.
        alpha: the LoRA scaling numerator (updates are scaled by ``alpha / rank``).
        lora_dropout: dropout on the adapters' input.

    Returns:
        The ``LoraConfig``.
    """
    return _peft().LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=lora_dropout,
        target_modules=list(TARGET_MODULES),
        modules_to_save=["head"],
    )


def load_adapter(path: str | os.PathLike) -> torch.nn.Module:
    """A trained adapter (a run folder of this recipe) on a freshly loaded MiniLM classifier.

    Args:
        path: the folder holding ``adapter_config.json`` and ``adapter_model.safetensors``.

    Returns:
        The ``PeftModel``, in eval mode.

    Example::

        model = load_adapter("runs/lora")
        model(input_ids=ids, attention_mask=mask)["logits"]
    """
    base = drug_reviews.MiniLMClassifier(drug_reviews.load_encoder())
    return _peft().PeftModel.from_pretrained(base, str(path)).eval()


def build(
    *,
    seed: int = 0,
    rank: int = 8,
    alpha: int = 16,
    lora_dropout: float = 0.1,
    **data_options: Any,
) -> RecipeParts:
    """Build the LoRA drug-review recipe.

    Args:
        seed: seeds the data split, the head's and the adapters' initial weights and the run.
        rank: the LoRA rank ``r``.
        alpha: the LoRA ``alpha``.
        lora_dropout: dropout on the adapters' input.
        **data_options: the data options of :func:`medfunc.recipes.drug_reviews.build`
            (``max_train``, ``max_eval``, ``max_length``, ...).

    Returns:
        The :class:`~medfunc.recipes.base.RecipeParts` of ``drug_reviews`` with the model
        wrapped as a ``peft.PeftModel`` and the config of a LoRA fine-tune.

    Raises:
        ConfigError: an unknown option, a rank below 1, or a missing package.
    """
    if rank < 1:
        raise ConfigError(f"rank must be >= 1, got {rank}")
    config = lora_config(rank, alpha, lora_dropout)
    base = drug_reviews.build(seed=seed, **data_options)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _peft().get_peft_model(base.model, config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    steps = -(-len(base.train_dataset) // base.config["batch_size"])
    num_epochs = 3
    notes = (
        f"{base.notes.split(' Pretrained')[0]} Pretrained all-MiniLM-L6-v2 encoder frozen, LoRA "
        f"r={rank} (alpha {alpha}) on {'/'.join(TARGET_MODULES)} and a trained linear head: "
        f"{trainable:,} trainable parameters."
    )
    return dataclasses.replace(
        base,
        model=model,
        config={
            **base.config,
            "num_epochs": num_epochs,
            "learning_rate": 1e-3,
            "weight_decay": 0.0,
            "warmup_steps": max(1, steps * num_epochs // 10),
            "save_trainable_only": True,
        },
        notes=notes,
    )
