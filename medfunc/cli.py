"""The ``medfunc`` command: train a recipe, list recipes, inspect and export checkpoints.

``medfunc train`` with no arguments fine-tunes the default recipe (breast_cancer): the validation
split chooses the best model, and the last line is the test split's metrics, scored once with
that model. ``medfunc train run.toml --set num_epochs=3`` runs a config file. Errors in configs,
checkpoints, data, files and arguments print one line on stderr and exit with status 2.

Example::

    $ medfunc train --output-dir runs/demo
    $ medfunc recipes
    $ medfunc inspect runs/demo/checkpoint-epoch20.pt
    $ medfunc export runs/demo/checkpoint-epoch20.pt --onnx
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medfunc import __version__
from medfunc.errors import (
    CheckpointMismatchError,
    ConfigError,
    MedfuncError,
    TrainingInterrupted,
)
from medfunc.logging import ConsoleHandler

EXIT_ERROR = 2
SUMMARY_METRICS = ("auroc", "accuracy", "f1", "precision", "recall", "loss")
_CLI_DEFAULTS = {"enable_tensorboard": True}


def parse_override(text: str) -> tuple[str, Any]:
    """Parse one ``--set KEY=VALUE``; the value is read as JSON when it is valid JSON.

    Args:
        text: e.g. ``"num_epochs=3"``, ``"betas=[0.9, 0.99]"``, ``"optimizer=sgd"``.

    Returns:
        ``(key, value)``: ``("num_epochs", 3)``, ``("betas", [0.9, 0.99])``, ``("optimizer",
        "sgd")``.

    Raises:
        ConfigError: there is no ``=`` or no key.

    Example:
        >>> parse_override("use_amp=true")
        ('use_amp', True)
    """
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set expects KEY=VALUE (e.g. --set num_epochs=3), got {text!r}")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip(), value


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


def _run_options(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    from medfunc.trainer_config import apply_overrides, load_config_file

    overrides = dict(parse_override(text) for text in args.overrides)
    if args.config:
        source = f"{args.config} (with --set)" if overrides else str(args.config)
    else:
        source = "--set"
    mapping = load_config_file(args.config) if args.config else {}
    return apply_overrides(mapping, overrides), source


def _final_metrics(trainer: Any, result: Any, eval_dataset: Any) -> dict[str, float]:
    if result.loaded_best or (result.eval_metrics and not result.history):  # best or idle run
        return result.eval_metrics
    if result.history and result.history[-1]["step"] == result.global_step:
        return {k: v for k, v in result.history[-1].items() if k not in ("epoch", "step")}
    return trainer.evaluate(eval_dataset)


def _shown(metrics: dict[str, float]) -> str:
    return " ".join(f"{key}={metrics[key]:.4f}" for key in SUMMARY_METRICS if key in metrics)


def _metric_lines(trainer: Any, result: Any, parts: Any) -> list[str]:
    """The validation line and, last, the test line (the test split scored once, here)."""
    which = (
        f"best model: epoch {result.best_epoch} step {result.best_step}, "
        if result.loaded_best
        else "final model, "
    )
    positive = f"positive = {parts.positive_label}"
    validation = _final_metrics(trainer, result, parts.eval_dataset)
    lines = [
        f"validation ({which}{len(parts.eval_dataset)} examples, chose the model): "
        + _shown(validation)
    ]
    if parts.test_dataset is None:
        lines[0] += f" [{positive}; the recipe has no test split]"
        return lines
    test = trainer.evaluate(parts.test_dataset)
    lines.append(f"test ({which}{len(parts.test_dataset)} examples, {positive}): " + _shown(test))
    return lines


def cmd_train(args: argparse.Namespace) -> int:
    """``medfunc train [CONFIG] [--recipe NAME] [--set KEY=VALUE ...] [--output-dir DIR]
    [--overwrite]``."""
    from medfunc import distributed
    from medfunc.plots import plot_metrics
    from medfunc.recipes import DEFAULT_RECIPE, get_recipe
    from medfunc.run_folder import default_run_dir
    from medfunc.trainer import MedicalModelTrainer
    from medfunc.trainer_config import RUN_KEYS, TrainerConfig

    started = time.perf_counter()
    distributed.init()
    mapping, source = _run_options(args)
    name = args.recipe or mapping.get("recipe") or DEFAULT_RECIPE
    recipe_options = mapping.get("recipe_options") or {}
    if not isinstance(recipe_options, dict):
        raise ConfigError(
            f"{source}: recipe_options must be a mapping of recipe options, got "
            f"{type(recipe_options).__name__}"
        )
    user_options = {k: v for k, v in mapping.items() if k not in RUN_KEYS}
    if args.overwrite:
        user_options["overwrite_output_dir"] = True
    checked = TrainerConfig.from_dict(user_options, source=source)  # fail fast, before the data
    output_dir = Path(
        args.output_dir
        or mapping.get("output_dir")
        or (Path(checked.resume_from).parent if checked.resume_from else default_run_dir(name))
    )
    parts = get_recipe(name).build(**recipe_options)
    config = TrainerConfig.from_dict(
        {**_CLI_DEFAULTS, **parts.config, **user_options}, source=source
    )
    if config.export_input_example is None:
        config = dataclasses.replace(config, export_input_example=parts.export_example)
    main = distributed.get_info().rank == 0
    say = print if main else (lambda *a, **k: None)
    say(f"recipe: {name} - {parts.notes}")
    say(f"output: {output_dir}")
    trainer = MedicalModelTrainer(
        parts.model, config, run_metadata={"recipe": name, "recipe_options": recipe_options}
    )
    result = trainer.train(parts.train_dataset, parts.eval_dataset, output_dir=output_dir)
    metric_lines = _metric_lines(trainer, result, parts)
    if main:
        plot = plot_metrics(output_dir / "metrics.jsonl", output_dir / "metrics.png")
        if result.checkpoints:
            say(f"checkpoint: {result.checkpoints[-1]}")
        if result.best_checkpoint is not None:
            say(f"best checkpoint: {result.best_checkpoint}")
        say(f"weights: {result.weights_path}")
        if config.enable_tensorboard:
            say(f"tensorboard: {Path(config.tb_log_dir or output_dir / 'tb_logs')}")
        say(f"plot: {plot}")
        for fmt, path in result.exports.items():
            say(f"{fmt}: {path}")
        for fmt, reason in result.export_errors.items():
            say(f"{fmt} export failed: {reason}")
        stopped = " (early stopping)" if result.stopped_early else ""
        say(
            f"{result.global_step} optimizer steps, {result.epochs_completed} epochs{stopped} "
            f"in {time.perf_counter() - started:.1f} s"
        )
    for line in metric_lines:
        say(line)
    distributed.shutdown()
    return 0


def cmd_recipes(args: argparse.Namespace) -> int:
    """``medfunc recipes``: list the built-in recipes."""
    from medfunc.recipes import DEFAULT_RECIPE, RECIPES

    width = max(len(name) for name in RECIPES)
    for name, recipe in RECIPES.items():
        mark = " (default)" if name == DEFAULT_RECIPE else ""
        print(f"{name:<{width}}  {recipe.description}{mark}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    """``medfunc inspect CKPT``: summarise a checkpoint."""
    from medfunc.checkpoint import inspect_checkpoint

    print(inspect_checkpoint(args.checkpoint))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """``medfunc export CKPT [--onnx] [--torchscript]``: export a recipe checkpoint's model."""
    from medfunc import export, optim
    from medfunc.checkpoint import read_checkpoint
    from medfunc.recipes import get_recipe
    from medfunc.state import init_state

    if not (args.onnx or args.torchscript):
        raise ConfigError("medfunc export: choose a format with --onnx and/or --torchscript")
    payload = read_checkpoint(args.checkpoint)
    run = (payload.get("trainer_state") or {}).get("run") or {}
    name = args.recipe or run.get("recipe")
    if not name:
        raise ConfigError(f"{args.checkpoint} does not record its recipe; pass --recipe NAME")
    parts = get_recipe(name).build(**(run.get("recipe_options") or {}))
    if parts.export_example is None:
        raise ConfigError(
            f"recipe {name!r} provides no export example; its model cannot be "
            "exported from the command line"
        )
    try:
        parts.model.load_state_dict(payload["model_state"])
    except RuntimeError as err:
        raise CheckpointMismatchError(
            f"{args.checkpoint} does not fit the model of recipe {name!r}: {_one_line(err)[:300]}"
        ) from None
    state = init_state(parts.model, optim.chain())
    out = Path(args.output_dir or Path(args.checkpoint).parent)
    targets = {"torchscript": out / "model.pt", "onnx": out / "model.onnx"}
    wanted = [fmt for fmt in targets if getattr(args, fmt)]
    existing = [str(targets[fmt]) for fmt in wanted if targets[fmt].exists()]
    if existing and not args.overwrite:
        raise ConfigError(
            f"{', '.join(existing)} already exist(s) (a run's export is not replaced silently); "
            "pass --overwrite to replace, or --output-dir DIR to write elsewhere"
        )
    out.mkdir(parents=True, exist_ok=True)
    if args.torchscript:
        path = export.to_torchscript(state, parts.export_example, targets["torchscript"])
        print(f"torchscript: {path}")
    if args.onnx:
        path = export.to_onnx(state, parts.export_example, targets["onnx"], opset=args.opset)
        print(f"onnx: {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``medfunc`` argument parser (one sub-command per action).

    Returns:
        The parser.

    Example:
        >>> build_parser().parse_args(["train", "--set", "num_epochs=1"]).overrides
        ['num_epochs=1']
    """
    parser = argparse.ArgumentParser(
        prog="medfunc",
        description="Functional PyTorch fine-tuning for medical models: train a built-in "
        "recipe, list recipes, inspect and export checkpoints.",
    )
    parser.add_argument("--version", action="version", version=f"medfunc {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    train = sub.add_parser(
        "train",
        help="fine-tune a recipe (default: breast_cancer) and report its test metrics",
        description="Fine-tune a recipe; the validation split chooses the best model, and the "
        "last line printed is the test split's metrics, scored once with that model. Without "
        "arguments it runs the default recipe (breast_cancer). Writes checkpoints, "
        "metrics.jsonl, TensorBoard logs, model.safetensors and a metrics plot to the output "
        "folder. Any TrainerConfig option is set with --set KEY=VALUE.",
    )
    train.add_argument(
        "config",
        nargs="?",
        type=Path,
        help="a TOML, YAML or JSON run file: a 'recipe' key, an optional "
        "'recipe_options' table and any TrainerConfig options",
    )
    train.add_argument(
        "--recipe", help="the recipe to run (overrides the file's 'recipe'; see `medfunc recipes`)"
    )
    train.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override an option, e.g. --set num_epochs=3 or --set "
        "recipe_options.seed=1; VALUE is parsed as JSON when it can be "
        "(repeatable)",
    )
    train.add_argument(
        "--output-dir",
        type=Path,
        help="run folder (default: a new runs/<recipe>-<timestamp>-<pid>, or the folder of "
        "the checkpoint being resumed); it must be new or empty unless --overwrite",
    )
    train.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the previous run in --output-dir (its files are removed first; a folder "
        "holding files the trainer does not write is refused)",
    )
    train.set_defaults(func=cmd_train, parser=train)

    recipes = sub.add_parser(
        "recipes", help="list the built-in recipes", description="List the built-in recipes."
    )
    recipes.set_defaults(func=cmd_recipes, parser=recipes)

    inspect = sub.add_parser(
        "inspect",
        help="summarise a checkpoint file",
        description="Print what a medfunc checkpoint holds.",
    )
    inspect.add_argument("checkpoint", type=Path, help="a checkpoint-*.pt file")
    inspect.set_defaults(func=cmd_inspect, parser=inspect)

    export = sub.add_parser(
        "export",
        help="export a recipe checkpoint to ONNX and/or TorchScript",
        description="Rebuild the recipe's model from a checkpoint written by `medfunc train` "
        "and export it (the exported file is checked against the eager model).",
    )
    export.add_argument("checkpoint", type=Path, help="a checkpoint-*.pt file")
    export.add_argument("--onnx", action="store_true", help="write model.onnx")
    export.add_argument("--torchscript", action="store_true", help="write model.pt")
    export.add_argument(
        "--opset", type=int, default=None, help="ONNX opset (default: the exporter's)"
    )
    export.add_argument(
        "--recipe",
        help="the recipe whose model the checkpoint holds (default: "
        "the one recorded in the checkpoint)",
    )
    export.add_argument(
        "--output-dir", type=Path, help="where to write (default: the checkpoint's folder)"
    )
    export.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing model.pt / model.onnx (refused without it)",
    )
    export.set_defaults(func=cmd_export, parser=export)
    return parser


def _unknown_arguments(unknown: Sequence[str]) -> str:
    """argparse's message for ``unknown`` arguments, with a hint towards ``--set``."""
    message = f"unrecognized arguments: {' '.join(unknown)}"
    flags = [a.lstrip("-").replace("-", "_") for a in unknown if a.startswith("--")]
    if flags:
        from medfunc.trainer_config import TrainerConfig

        names = [f.name for f in dataclasses.fields(TrainerConfig)]
        close = difflib.get_close_matches(flags[0].split("=")[0], names, n=1, cutoff=0.5)
        option = close[0] if close else "num_epochs"
        message += f" (TrainerConfig options are set with --set KEY=VALUE, e.g. --set {option}=...)"
    return message


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``medfunc`` command.

    Args:
        argv: the arguments (default ``sys.argv[1:]``).

    Returns:
        The exit status: 0 on success, 2 for a configuration, checkpoint, data or file error
        or a bad argument (one line on stderr, no traceback; argparse adds the command's
        usage for a bad argument).

    Example:
        >>> main(["recipes"])
        breast_cancer      MLP on the Wisconsin diagnostic breast cancer data ... (default)
        drug_reviews       fine-tune MiniLM on drugs.com reviews (birth control vs other condition)
        drug_reviews_lora  LoRA r=8 adapters on a frozen MiniLM, drugs.com reviews (peft)
        0
        >>> main(["inspect", "missing.pt"])  # "medfunc: error: ..." on stderr
        2
    """
    args, unknown = build_parser().parse_known_args(argv)
    if unknown:
        args.parser.error(_unknown_arguments(unknown))
    handler = ConsoleHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    medfunc_log = logging.getLogger("medfunc")
    level = medfunc_log.level  # restored on return: main() may run inside a larger program
    medfunc_log.addHandler(handler)
    medfunc_log.setLevel(logging.INFO)
    try:
        return args.func(args)
    except TrainingInterrupted as err:
        print(f"medfunc: {_one_line(err)}", file=sys.stderr)
        return err.exit_code
    except MedfuncError as err:
        print(f"medfunc: error: {_one_line(err)}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as err:  # the file system refused: a read-only folder, a full disk
        where = f"{err.filename}: " if err.filename else ""
        reason = err.strerror or _one_line(err)
        print(f"medfunc: error: {where}{reason}", file=sys.stderr)
        return EXIT_ERROR
    finally:
        medfunc_log.removeHandler(handler)
        medfunc_log.setLevel(level)


if __name__ == "__main__":
    sys.exit(main())
