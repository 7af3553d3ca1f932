"""TrainerConfig: every option of :class:`~medfunc.trainer.MedicalModelTrainer`, validated.

The options and their defaults follow the seed document of the Trainer facade; each value is
checked when the config is built, and a wrong one raises :class:`~medfunc.errors.ConfigError`
naming the field and what it accepts. Configs load from TOML, YAML or JSON files, with dotted
overrides such as ``{"deepspeed_config.zero_optimization.stage": 2}``.

Example:
    >>> config = TrainerConfig(num_epochs=3, learning_rate=1e-3, scheduler="cosine")
    >>> _ = Path("train.toml").write_text('num_epochs = 3\\nscheduler = "cosine"\\n')
    >>> config = TrainerConfig.from_file("train.toml", overrides={"num_epochs": 1})
    >>> config.num_epochs, config.scheduler
    (1, 'cosine')
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from medfunc import metric_names, validation
from medfunc.errors import ConfigError
from medfunc.logging import LOG_LEVELS
from medfunc.modeling import DEFAULT_RECOMPUTE_PATTERNS
from medfunc.optim.optimizers import OPTIMIZER_NAMES
from medfunc.schedules import ANNEAL_STRATEGIES, SCHEDULE_NAMES

#: The ``optimizer`` names: those of :data:`medfunc.optim.OPTIMIZERS`.
OPTIMIZERS = OPTIMIZER_NAMES
#: The ``scheduler`` names: those of :data:`medfunc.schedules.SCHEDULES`.
SCHEDULERS = SCHEDULE_NAMES
CLIP_MODES = ("norm", "value", "none")
METRIC_MODES = ("auto", "min", "max")
COMPILE_MODES = ("inductor", "cudagraph", "inductor+cudagraph")
DDP_BACKENDS = ("nccl", "gloo")
AMP_DTYPES = {
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}
#: Keys of a run file that belong to the ``medfunc`` command, not to TrainerConfig.
RUN_KEYS = ("recipe", "recipe_options", "output_dir")
#: Fields that hold Python objects and cannot come from a config file.
_OBJECT_FIELDS = (
    "eval_compute_metrics",
    "eval_set_metrics",
    "export_input_example",
    "collate_fn",
    "visualize_fn",
)


@dataclasses.dataclass
class TrainerConfig:
    """Options of :class:`~medfunc.trainer.MedicalModelTrainer` (see docs/trainer.md).

    Every field is validated on construction; :meth:`from_file` and :meth:`from_dict` build a
    config from a file or a mapping. ``docs/trainer.md`` has the table of all options.

    Example:
        >>> TrainerConfig(optimizer="sgd", sgd_momentum=0.9, grad_clip_mode="value")
        TrainerConfig(optimizer='sgd', learning_rate=5e-05, ..., sgd_momentum=0.9, ...)
    """

    # optimizer
    optimizer: str = "adamw"
    learning_rate: float = 5e-5
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    sgd_momentum: float = 0.9
    layer_wise_lrs: list[tuple[str, float]] | None = None
    # learning-rate schedule (counted in optimizer steps)
    scheduler: str = "linear_warmup"
    warmup_steps: int = 0
    total_steps: int | None = None
    step_size: int = 1000
    gamma: float = 0.1
    t_max: int | None = None
    eta_min: float = 0.0
    pct_start: float = 0.3
    anneal_strategy: str = "cos"
    div_factor: float = 25.0
    final_div_factor: float = 1e4
    cycle_momentum: bool = True
    base_momentum: float = 0.85
    max_momentum: float = 0.95
    # gradients
    grad_clip_mode: str = "norm"
    max_grad_norm: float | None = 1.0
    grad_clip_value: float = 0.5
    gradient_accumulation_steps: int = 1
    ema_decay: float | None = None
    max_consecutive_skipped_steps: int | None = 100
    allow_no_update_epochs: bool = False
    # precision and device
    use_amp: bool = False
    amp_dtype: Any = torch.float16
    device: str = "auto"
    compile: bool | str = False
    # loop
    num_epochs: int = 1
    batch_size: int = 8
    eval_batch_size: int | None = None
    shuffle: bool = True
    collate_fn: Callable[[list], Any] | None = None
    seed: int = 42
    num_workers: int = 2
    pin_memory: bool = True
    persistent_workers: bool = True
    prefetch_factor: int = 2
    log_every: int = 50
    progress_bar: bool | None = None
    log_level: str = "info"
    # evaluation
    eval_every_steps: int | None = None
    eval_at_epoch_end: bool = True
    eval_metric: str = "loss"
    eval_metric_mode: str = "auto"
    eval_compute_metrics: Callable[[Any, Any], Mapping[str, float]] | None = None
    eval_set_metrics: Callable[[list, torch.Tensor], Mapping[str, float]] | None = None
    early_stopping_patience: int | None = None
    early_stopping_min_delta: float = 0.0
    load_best_model_at_end: bool | None = None
    eval_with_ema: bool = False
    # checkpoints
    save_every_epochs: int | None = 1
    save_every_steps: int | None = None
    save_total_limit: int | None = None
    save_optimizer: bool = True
    save_scheduler: bool = True
    save_trainable_only: bool | None = None
    resume_from: str | None = None
    overwrite_output_dir: bool = False
    # export
    export_torchscript: bool = False
    export_onnx: bool = False
    export_input_example: Any = None
    onnx_opset: int | None = None
    # logging
    enable_tensorboard: bool = False
    tb_log_dir: str | None = None
    enable_wandb: bool = False
    wandb_project: str | None = None
    wandb_run_name: str | None = None
    # model preparation
    gradient_checkpointing: bool = False
    channels_last: bool = False
    dropout_prob: float | None = None
    activation_recompute: bool = False
    activation_recompute_patterns: tuple[str, ...] = DEFAULT_RECOMPUTE_PATTERNS
    cudnn_benchmark: bool = True
    # model versions and visualisation
    model_versioning: bool = True
    visualize_every_steps: int | None = None
    visualize_fn: Callable[[Any, Any, int, Path], Any] | None = None
    # distributed
    use_ddp: bool = False
    ddp_backend: str = "nccl"
    ddp_find_unused_parameters: bool = False
    fsdp: bool = False
    deepspeed: bool = False
    deepspeed_config: dict | str | None = None

    def __post_init__(self) -> None:
        for name, check in _CHECKS.items():
            setattr(self, name, check(f"TrainerConfig.{name}", getattr(self, name)))
        _check_combinations(self)

    @property
    def precision(self) -> str:
        """The precision policy name the options select: "fp32", "fp16" or "bf16"."""
        if not self.use_amp:
            return "fp32"
        return "bf16" if self.amp_dtype == torch.bfloat16 else "fp16"

    @property
    def metric_mode(self) -> str:
        """``eval_metric_mode`` with "auto" resolved: "min" for losses and distances, else "max"."""
        if self.eval_metric_mode != "auto":
            return self.eval_metric_mode
        return metric_names.default_mode(self.eval_metric)

    def to_dict(self) -> dict[str, Any]:
        """The options as plain JSON-able values (for W&B run configs and run records).

        Returns:
            field name -> value; dtypes become their names, callables and tensors their repr.

        Example:
            >>> TrainerConfig().to_dict()["amp_dtype"]
            'float16'
        """
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.dtype):
                value = str(value).removeprefix("torch.")
            elif f.name in _OBJECT_FIELDS and value is not None:
                value = type(value).__name__
            elif isinstance(value, tuple):
                value = list(value)
            elif isinstance(value, list):
                value = [list(v) if isinstance(v, tuple) else v for v in value]
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, options: Mapping[str, Any], *, source: str = "config") -> TrainerConfig:
        """Build a config from a mapping of field values (as read from a file).

        Numeric strings are accepted for float fields (YAML reads ``1e-3`` as a string).

        Args:
            options: field name -> value.
            source: where the options came from, used in error messages.

        Returns:
            The validated config.

        Raises:
            ConfigError: an unknown key (with the closest known name) or an invalid value.

        Example:
            >>> config = TrainerConfig.from_dict({"num_epochs": 2, "learning_rate": "1e-3"})
            >>> config.learning_rate
            0.001
        """
        if not isinstance(options, Mapping):
            raise ConfigError(
                f"{source}: expected a mapping of options, got {type(options).__name__}"
            )
        names = [f.name for f in dataclasses.fields(cls)]
        values = {}
        for key, value in options.items():
            if key not in names:
                raise ConfigError(f"{source}: {_unknown_key_message(key, names)}")
            if key in _FLOAT_FIELDS and isinstance(value, str):
                value = _parse_float_string(value)
            values[key] = value
        try:
            return cls(**values)
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from None

    @classmethod
    def from_file(
        cls, path: str | Path, overrides: Mapping[str, Any] | None = None
    ) -> TrainerConfig:
        """Load a config from a TOML, YAML or JSON file, then apply dotted ``overrides``.

        The file is a mapping of option names to values. The run keys ``recipe``,
        ``recipe_options`` and ``output_dir`` (read by the ``medfunc`` command) are ignored
        here.

        Args:
            path: a ``.toml``, ``.yaml``/``.yml`` or ``.json`` file.
            overrides: ``{"key": value}`` or ``{"a.b.c": value}`` for nested mappings.

        Returns:
            The validated config.

        Raises:
            ConfigError: the file is missing, unreadable or malformed (the message names the
                file and line), a key is unknown, or a value is invalid.

        Example:
            >>> _ = Path("run.yaml").write_text("num_epochs: 5\\nlearning_rate: 1.0e-3\\n")
            >>> config = TrainerConfig.from_file("run.yaml", overrides={"num_epochs": 1})
            >>> config.num_epochs, config.learning_rate
            (1, 0.001)
        """
        mapping = apply_overrides(load_config_file(path), overrides or {})
        options = {k: v for k, v in mapping.items() if k not in RUN_KEYS}
        return cls.from_dict(options, source=str(path))


def _checked_init(init: Callable[..., None]) -> Callable[..., None]:
    """Wrap the dataclass ``__init__``: an unknown keyword is a ConfigError with a did-you-mean."""

    @functools.wraps(init)
    def __init__(self: TrainerConfig, *args: Any, **kwargs: Any) -> None:
        names = [f.name for f in dataclasses.fields(type(self))]
        for key in kwargs:
            if key not in names:
                raise ConfigError(f"TrainerConfig: {_unknown_key_message(key, names)}")
        init(self, *args, **kwargs)

    return __init__


TrainerConfig.__init__ = _checked_init(TrainerConfig.__init__)  # type: ignore[method-assign]


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML, YAML or JSON file into a dict, with one-line errors.

    Args:
        path: the file; the format follows the extension (``.toml``, ``.yaml``, ``.yml``,
            ``.json``).

    Returns:
        The file's top-level mapping.

    Raises:
        ConfigError: missing file, unknown extension, a syntax error (naming file and line) or a
            top level that is not a mapping.

    Example:
        >>> _ = Path("run.toml").write_text('recipe = "breast_cancer"\\nnum_epochs = 3\\n')
        >>> load_config_file("run.toml")["recipe"]
        'breast_cancer'
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".toml", ".yaml", ".yml", ".json"):
        raise ConfigError(
            f"{path}: unsupported config format {suffix or '(no extension)'!r}; "
            "use a .toml, .yaml, .yml or .json file"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"config file {path} cannot be read: {err}") from None
    if suffix == ".toml":
        data = _parse_toml(text, path)
    elif suffix == ".json":
        data = _parse_json(text, path)
    else:
        data = _parse_yaml(text, path)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: the top level must be a mapping of options, got {type(data).__name__}"
        )
    return data


def apply_overrides(mapping: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Return a copy of ``mapping`` with dotted-key ``overrides`` applied.

    Args:
        mapping: the options (nested mappings allowed).
        overrides: ``{"num_epochs": 1, "recipe_options.seed": 3}``; a dotted key walks (and
            creates) nested mappings.

    Returns:
        The new mapping; ``mapping`` is not modified.

    Raises:
        ConfigError: a dotted key passes through a value that is not a mapping.

    Example:
        >>> apply_overrides({"a": {"b": 1}}, {"a.b": 2, "c": 3})
        {'a': {'b': 2}, 'c': 3}
    """
    result = _deep_copy(mapping)
    for dotted, value in overrides.items():
        parts = str(dotted).split(".")
        if not all(parts):
            raise ConfigError(f"override key {dotted!r} is malformed; use name or a.b.c")
        node = result
        for depth, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                prefix = ".".join(parts[: depth + 1])
                raise ConfigError(
                    f"override {dotted!r}: {prefix!r} holds "
                    f"{type(child).__name__}, not a mapping of options"
                )
            node = child
        node[parts[-1]] = value
    return result


def _deep_copy(mapping: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, Mapping) else v for k, v in mapping.items()}


def _toml_module(path: Path) -> Any:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        try:
            import tomli as tomllib
        except ModuleNotFoundError:
            raise ConfigError(
                f"{path}: reading TOML on Python 3.10 needs the tomli package: run `pip install "
                "tomli` or use a .yaml or .json file"
            ) from None
    return tomllib


def _parse_toml(text: str, path: Path) -> Any:
    tomllib = _toml_module(path)
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        message = str(err).splitlines()[0]
        raise ConfigError(f"{path}: invalid TOML: {message}") from None


def _parse_json(text: str, path: Path) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}, line {err.lineno}: invalid JSON: {err.msg}") from None


def _parse_yaml(text: str, path: Path) -> Any:
    try:
        import yaml
    except ImportError:
        raise ConfigError(
            f"{path}: reading YAML needs PyYAML: run `pip install pyyaml` or use "
            "a .toml or .json file"
        ) from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f", line {mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{path}{where}: invalid YAML: {problem}") from None


def _unknown_key_message(key: Any, names: list[str]) -> str:
    close = difflib.get_close_matches(str(key), names, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else "; see docs/trainer.md for the options"
    return f"unknown option {key!r}{hint}"


def _parse_float_string(value: str) -> Any:
    try:
        return float(value)
    except ValueError:
        return value


# ----------------------------------------------------------------------------------------------
# field checks: each is ``check(field, value)`` and returns the (normalised) value or raises
# ConfigError naming the field; the general ones come from medfunc.validation
# ----------------------------------------------------------------------------------------------


def _choice(*allowed: str) -> Callable[[str, Any], str]:
    return functools.partial(validation.one_of, allowed=allowed, normalize=True)


def _optional_string(name: str, value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, Path):
        return str(value)
    if not isinstance(value, str) or not value:
        raise validation.fail(name, "a non-empty string or None", value)
    return value


def _layer_wise_lrs(name: str, value: Any) -> list[tuple[str, float]] | None:
    if value is None:
        return None
    return list(validation.name_multipliers(name, value))


def _amp_dtype(name: str, value: Any) -> torch.dtype:
    if value in (torch.float16, torch.bfloat16):
        return value
    key = value.strip().lower().removeprefix("torch.") if isinstance(value, str) else None
    if key not in AMP_DTYPES:
        raise validation.fail(
            name,
            "torch.float16 or torch.bfloat16 (or 'float16', 'bfloat16', 'fp16', 'bf16')",
            value,
        )
    return AMP_DTYPES[key]


def _device(name: str, value: Any) -> str:
    if value is None:
        return "auto"
    if isinstance(value, torch.device):
        value = str(value)
    key = value.strip().lower() if isinstance(value, str) else None
    base = key.split(":")[0] if key else None
    index_ok = key is not None and (":" not in key or key.split(":", 1)[1].isdigit())
    if (
        base not in ("auto", "cpu", "cuda", "xla")
        or not index_ok
        or (base in ("auto", "cpu") and ":" in key)
    ):
        raise validation.fail(name, "'auto', 'cpu', 'cuda', 'cuda:N' or 'xla'", value)
    return key


def _compile(name: str, value: Any) -> bool | str:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in COMPILE_MODES:
        return value.strip().lower()
    raise validation.fail(
        name,
        "false, true (the device's default mode) or one of "
        + ", ".join(repr(m) for m in COMPILE_MODES),
        value,
    )


def _eval_metric(name: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise validation.fail(
            name, "a metric name such as 'loss', 'accuracy', 'f1' or 'auroc'", value
        )
    key = value.strip()
    for prefix in ("eval/", "eval_"):
        key = key.removeprefix(prefix)
    return key


def _batch_metric_fn(name: str, value: Any) -> Callable | None:
    if value is not None and not callable(value):
        raise validation.fail(
            name, "a callable (batch, model_output) -> dict of floats, or None", value
        )
    return value


def _set_metric_fn(name: str, value: Any) -> Callable | None:
    if value is not None and not callable(value):
        raise validation.fail(
            name, "a callable (outputs_list, labels) -> dict of floats, or None", value
        )
    return value


def _collate_fn(name: str, value: Any) -> Callable | None:
    if value is not None and not callable(value):
        raise validation.fail(name, "a callable list_of_examples -> batch, or None", value)
    return value


def _export_example(name: str, value: Any) -> Any:
    if value is None or isinstance(value, (Mapping, tuple, list, torch.Tensor)):
        return value
    raise validation.fail(name, "a dict (or tuple) of example input tensors, or None", value)


def _visualize_fn(name: str, value: Any) -> Callable | None:
    if value is not None and not callable(value):
        raise validation.fail(
            name, "a callable (batch, outputs, global_step, output_dir) -> None, or None", value
        )
    return value


def _recompute_patterns(name: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = (value,)
    if (
        not isinstance(value, (list, tuple))
        or not value
        or not all(isinstance(p, str) and p for p in value)
    ):
        raise validation.fail(name, "a non-empty list of module-name substrings", value)
    return tuple(value)


def _deepspeed_config(name: str, value: Any) -> dict | str | None:
    if value is None or isinstance(value, dict):
        return value
    if isinstance(value, (str, Path)) and str(value):
        return str(value)
    raise validation.fail(name, "a DeepSpeed config dict, a path to a JSON file, or None", value)


_CHECKS: dict[str, Callable[[str, Any], Any]] = {
    "optimizer": _choice(*OPTIMIZERS),
    "learning_rate": validation.non_negative_float,
    "weight_decay": validation.non_negative_float,
    "betas": validation.betas,
    "eps": validation.non_negative_float,
    "sgd_momentum": validation.probability,
    "layer_wise_lrs": _layer_wise_lrs,
    "scheduler": _choice(*SCHEDULERS),
    "warmup_steps": validation.non_negative_int,
    "total_steps": functools.partial(validation.positive_int, optional=True),
    "step_size": validation.positive_int,
    "gamma": validation.non_negative_float,
    "t_max": functools.partial(validation.positive_int, optional=True),
    "eta_min": validation.non_negative_float,
    "pct_start": validation.fraction,
    "anneal_strategy": _choice(*ANNEAL_STRATEGIES),
    "div_factor": validation.positive_float,
    "final_div_factor": validation.positive_float,
    "cycle_momentum": validation.boolean,
    "base_momentum": validation.probability,
    "max_momentum": validation.probability,
    "grad_clip_mode": _choice(*CLIP_MODES),
    "max_grad_norm": functools.partial(validation.positive_float, optional=True),
    "grad_clip_value": validation.positive_float,
    "gradient_accumulation_steps": validation.positive_int,
    "ema_decay": functools.partial(validation.probability, optional=True),
    "max_consecutive_skipped_steps": functools.partial(validation.positive_int, optional=True),
    "allow_no_update_epochs": validation.boolean,
    "use_amp": validation.boolean,
    "amp_dtype": _amp_dtype,
    "device": _device,
    "compile": _compile,
    "num_epochs": validation.positive_int,
    "batch_size": validation.positive_int,
    "eval_batch_size": functools.partial(validation.positive_int, optional=True),
    "shuffle": validation.boolean,
    "collate_fn": _collate_fn,
    "seed": validation.non_negative_int,
    "num_workers": validation.non_negative_int,
    "pin_memory": validation.boolean,
    "persistent_workers": validation.boolean,
    "prefetch_factor": validation.positive_int,
    "log_every": validation.positive_int,
    "progress_bar": functools.partial(validation.boolean, optional=True),
    "log_level": _choice(*LOG_LEVELS),
    "eval_every_steps": functools.partial(validation.positive_int, optional=True),
    "eval_at_epoch_end": validation.boolean,
    "eval_metric": _eval_metric,
    "eval_metric_mode": _choice(*METRIC_MODES),
    "eval_compute_metrics": _batch_metric_fn,
    "eval_set_metrics": _set_metric_fn,
    "early_stopping_patience": functools.partial(validation.positive_int, optional=True),
    "early_stopping_min_delta": validation.non_negative_float,
    "load_best_model_at_end": functools.partial(validation.boolean, optional=True),
    "eval_with_ema": validation.boolean,
    "save_every_epochs": functools.partial(validation.non_negative_int, optional=True),
    "save_every_steps": functools.partial(validation.positive_int, optional=True),
    "save_total_limit": functools.partial(validation.positive_int, optional=True),
    "save_optimizer": validation.boolean,
    "save_scheduler": validation.boolean,
    "save_trainable_only": functools.partial(validation.boolean, optional=True),
    "resume_from": _optional_string,
    "overwrite_output_dir": validation.boolean,
    "export_torchscript": validation.boolean,
    "export_onnx": validation.boolean,
    "export_input_example": _export_example,
    "onnx_opset": functools.partial(validation.integer, minimum=7, optional=True),
    "enable_tensorboard": validation.boolean,
    "tb_log_dir": _optional_string,
    "enable_wandb": validation.boolean,
    "wandb_project": _optional_string,
    "wandb_run_name": _optional_string,
    "gradient_checkpointing": validation.boolean,
    "channels_last": validation.boolean,
    "dropout_prob": functools.partial(validation.probability, optional=True),
    "activation_recompute": validation.boolean,
    "activation_recompute_patterns": _recompute_patterns,
    "model_versioning": validation.boolean,
    "visualize_every_steps": functools.partial(validation.positive_int, optional=True),
    "visualize_fn": _visualize_fn,
    "cudnn_benchmark": validation.boolean,
    "use_ddp": validation.boolean,
    "ddp_backend": _choice(*DDP_BACKENDS),
    "ddp_find_unused_parameters": validation.boolean,
    "fsdp": validation.boolean,
    "deepspeed": validation.boolean,
    "deepspeed_config": _deepspeed_config,
}
_FLOAT_FIELDS = frozenset(
    (
        "learning_rate",
        "weight_decay",
        "eps",
        "sgd_momentum",
        "gamma",
        "eta_min",
        "pct_start",
        "div_factor",
        "final_div_factor",
        "base_momentum",
        "max_momentum",
        "max_grad_norm",
        "grad_clip_value",
        "early_stopping_min_delta",
        "dropout_prob",
        "ema_decay",
    )
)


def _check_combinations(config: TrainerConfig) -> None:
    if config.total_steps is not None and config.warmup_steps > config.total_steps:
        raise ConfigError(
            f"TrainerConfig.warmup_steps ({config.warmup_steps}) must not exceed total_steps "
            f"({config.total_steps})"
        )
    if config.grad_clip_mode == "norm" and config.max_grad_norm is None:
        raise ConfigError(
            "TrainerConfig.max_grad_norm is None but grad_clip_mode='norm'; set "
            "a max_grad_norm > 0 or grad_clip_mode='none'"
        )
    if config.fsdp and config.deepspeed:
        raise ConfigError(
            "TrainerConfig.fsdp and TrainerConfig.deepspeed are both true; choose one"
        )
    if config.save_trainable_only and (config.fsdp or config.deepspeed):
        raise ConfigError(
            "TrainerConfig.save_trainable_only=True is not available with fsdp/deepspeed "
            "(their checkpoints are restored into a sharded template whose frozen base cannot "
            "be checked); set save_trainable_only=False"
        )
    custom = config.eval_compute_metrics is not None or config.eval_set_metrics is not None
    metric_names.check_eval_metric(config.eval_metric, custom=custom)
    _check_ema(config)


def _check_ema(config: TrainerConfig) -> None:
    """Refuse ``eval_with_ema`` without ``ema_decay``, and an EMA under FSDP or DeepSpeed."""
    if config.eval_with_ema and config.ema_decay is None:
        raise ConfigError(
            "TrainerConfig.eval_with_ema=True needs an EMA to evaluate with; set ema_decay "
            "(e.g. 0.999)"
        )
    if config.ema_decay is not None and (config.fsdp or config.deepspeed):
        raise ConfigError(
            "TrainerConfig.ema_decay is not available with fsdp=True or deepspeed=True (their "
            "sharded weights are not averaged); drop ema_decay or train without sharding"
        )
