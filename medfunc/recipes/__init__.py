"""Built-in recipes: runnable fine-tuning set-ups on medical data that ship with Python packages.

``breast_cancer`` (the default) trains a small MLP on the Wisconsin diagnostic breast cancer
data bundled with scikit-learn; ``drug_reviews`` fine-tunes a pretrained MiniLM encoder on
drugs.com patient reviews, and ``drug_reviews_lora`` trains LoRA adapters on the frozen
encoder instead. Nothing is downloaded at run time.

Example:
    >>> from medfunc.recipes import get_recipe
    >>> parts = get_recipe("breast_cancer").build(seed=0)
    >>> parts.config["num_epochs"]
    20
"""

from __future__ import annotations

from typing import Any

from medfunc.errors import ConfigError
from medfunc.recipes.base import Recipe, RecipeParts, TensorDictDataset

DEFAULT_RECIPE = "breast_cancer"


def _build_breast_cancer(**options: Any) -> RecipeParts:
    from medfunc.recipes import breast_cancer

    return breast_cancer.build(**options)


def _build_drug_reviews(**options: Any) -> RecipeParts:
    from medfunc.recipes import drug_reviews

    return drug_reviews.build(**options)


def _build_drug_reviews_lora(**options: Any) -> RecipeParts:
    from medfunc.recipes import drug_reviews_lora

    return drug_reviews_lora.build(**options)


RECIPES: dict[str, Recipe] = {
    "breast_cancer": Recipe(
        name="breast_cancer",
        description="MLP on the Wisconsin diagnostic breast cancer data (malignant vs benign)",
        build=_build_breast_cancer,
    ),
    "drug_reviews": Recipe(
        name="drug_reviews",
        description="fine-tune MiniLM on drugs.com reviews (birth control vs other condition)",
        build=_build_drug_reviews,
    ),
    "drug_reviews_lora": Recipe(
        name="drug_reviews_lora",
        description="LoRA r=8 adapters on a frozen MiniLM, drugs.com reviews (peft)",
        build=_build_drug_reviews_lora,
    ),
}


def get_recipe(name: str) -> Recipe:
    """Look up a recipe by name.

    Args:
        name: a key of :data:`RECIPES`.

    Returns:
        The recipe.

    Raises:
        ConfigError: no recipe has that name (the message lists the known ones).

    Example:
        >>> get_recipe("breast_cancer").name
        'breast_cancer'
    """
    try:
        return RECIPES[name]
    except KeyError:
        known = ", ".join(sorted(RECIPES))
        raise ConfigError(f"unknown recipe {name!r}; choose one of: {known}") from None


__all__ = ["DEFAULT_RECIPE", "RECIPES", "Recipe", "RecipeParts", "TensorDictDataset", "get_recipe"]
