"""Command line (`python -m stompp_hf`, or the `stompp-hf` script): `summary <checkpoint dir>` prints the size table
of a StoMPP checkpoint; `--version` prints the version."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Iterable, Iterator
from typing import Any

#: Weights files of a `save_pretrained` folder, in the order Transformers looks for them.
WEIGHTS_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


#: The state-dict key suffix of `nn.Module.get_extra_state` (torch's `_EXTRA_STATE_KEY_SUFFIX`).
EXTRA_STATE_KEY = "_extra_state"


class CheckpointError(Exception):
    """A folder `summary` cannot read, with the reason in one line (printed without a traceback)."""


def _one_line(text: Any, limit: int = 400) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _read_config(path: str) -> dict[str, Any]:
    """config.json of `path` as a dict, or a `CheckpointError` saying why not."""
    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
        raise CheckpointError(f"{path!r} has no config.json; pass a folder written by `save_pretrained`.")
    try:
        with open(file, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file} is not valid JSON ({_one_line(e)}).") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{file} must hold a JSON object, but holds a JSON {type(config).__name__}.")
    return config


def _check_safetensors(files: Iterable[str]) -> None:
    """Open every safetensors file (header and data extent), so a truncated or corrupt one fails here."""
    from safetensors import safe_open

    for file in files:
        if not os.path.isfile(file):
            raise CheckpointError(f"weights file {file} is missing.")
        try:
            with safe_open(file, framework="pt") as f:
                f.keys()
        except Exception as e:  # SafetensorError, OSError: both mean the file cannot be read
            raise CheckpointError(f"weights file {file} is corrupt or truncated ({_one_line(e)}).") from None


def _weights_files(path: str) -> list[str]:
    """The safetensors files of a Transformers folder (every shard of an index); `CheckpointError` if none."""
    for name in WEIGHTS_FILES:
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            continue
        if not name.endswith(".index.json"):
            return [file] if name.endswith(".safetensors") else []
        try:
            with open(file, encoding="utf-8") as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"weights index {file} is not a valid index ({_one_line(e)}).") from None
        return [os.path.join(path, s) for s in shards] if name.startswith("model.safetensors") else []
    raise CheckpointError(f"{path!r} has no weights file (none of {', '.join(WEIGHTS_FILES)}).")


def _model_class(config: dict[str, Any]):
    """The Transformers class config.json's `architectures` names (`AutoModel` when it names none)."""
    import transformers

    architectures = config.get("architectures") or []
    if not architectures:
        return transformers.AutoModel
    name = architectures[0]
    try:
        cls = getattr(transformers, name, None) if isinstance(name, str) else None
    except Exception:  # a lazily imported class whose backend is missing
        cls = None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise CheckpointError(
            f"config.json names architecture {name!r}, which is not a Transformers model class "
            f"(transformers {transformers.__version__})."
        )
    return cls


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """No load report or progress bar from Transformers (`_check_loading_info` reports what went wrong)."""
    from transformers.utils import logging

    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


def _check_loading_info(path: str, model_cls: type, info: dict[str, Any]) -> None:
    """`CheckpointError` if any weight of the model was not loaded from `path` (or a saved one was not used)."""

    def listed(keys) -> str:
        keys = sorted(str(k) for k in keys)
        return ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")

    problems = []
    # a module's `_extra_state` (a StoMPP mask and its progression step) holds no weight: a checkpoint written
    # before masks were saved lacks it and still describes the model's sizes
    missing = [k for k in info.get("missing_keys") or () if not str(k).endswith("." + EXTRA_STATE_KEY)]
    if missing:
        problems.append(f"{len(missing)} missing ({listed(missing)})")
    if info.get("unexpected_keys"):
        problems.append(f"{len(info['unexpected_keys'])} unexpected ({listed(info['unexpected_keys'])})")
    mismatched = info.get("mismatched_keys") or ()
    if mismatched:
        shapes = [f"{k} {tuple(saved)} vs {tuple(model)}" for k, saved, model in mismatched]
        problems.append(f"{len(shapes)} mismatched (checkpoint vs model shape: {listed(shapes)})")
    if info.get("error_msgs"):
        problems.append(f"errors: {_one_line('; '.join(map(str, info['error_msgs'])), 200)}")
    if problems:
        raise CheckpointError(
            f"the weights in {path} did not load into {model_cls.__name__}: {'; '.join(problems)}; the table would "
            "not describe this checkpoint."
        )


def _load(path: str):
    """The model saved in `path` and an example input for counting MACs (None for Transformers models).

    Raises:
        CheckpointError: for a folder without a readable config.json or weights file, an architecture Transformers
            does not have, or weights that do not load into the model (missing, unexpected or mismatched keys).
    """
    config = _read_config(path)
    if "architecture" in config and "pretrained_cfg" in config:  # timm's Hub layout (stompp_hf.integrations.timm)
        from .integrations.timm.io import WEIGHTS_NAME, from_pretrained
        from .integrations.timm.policy import example_input

        weights = os.path.join(path, WEIGHTS_NAME)
        if not os.path.isfile(weights):
            raise CheckpointError(f"{path!r} has no weights file ({WEIGHTS_NAME}).")
        _check_safetensors([weights])
        try:
            model = from_pretrained(path)
        except Exception as e:  # timm's model factory or a state dict that does not match: one line, no trace
            raise CheckpointError(f"cannot load {path} ({type(e).__name__}: {_one_line(e)})") from None
        return model, example_input(model, size=model.pretrained_cfg.get("input_size", (0, 224, 224))[-1])

    import stompp_hf  # noqa: F401  (registers the quantizer)

    _check_safetensors(_weights_files(path))
    model_cls = _model_class(config)
    try:
        with _quiet_transformers():
            # mismatched shapes are then listed in `info` (not raised, pointing at a report)
            model, info = model_cls.from_pretrained(path, output_loading_info=True, ignore_mismatched_sizes=True)
    except Exception as e:  # Transformers and the StoMPP quantizer raise many types: report them in one line
        raise CheckpointError(f"cannot load {path} ({type(e).__name__}: {_one_line(e)})") from None
    _check_loading_info(path, type(model), info)
    return model, None


def _prog() -> str:
    """How the user called the command line: the `stompp-hf` script, or `python -m stompp_hf`."""
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return name if name.startswith("stompp-hf") else "python -m stompp_hf"


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit status (1, with one line on stderr, for a checkpoint that does not
    load)."""
    from . import __version__

    parser = argparse.ArgumentParser(prog=_prog(), description=__doc__)
    parser.add_argument("--version", action="version", version=f"stompp_hf {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    summary_parser = commands.add_parser("summary", help="Print parameters, bits, bytes and MACs per module group.")
    summary_parser.add_argument(
        "path",
        help="A folder written by `save_pretrained` or `stompp_hf.integrations.timm.save_pretrained` (packed or "
        "latent).",
    )
    summary_parser.add_argument(
        "--export-dtype",
        choices=["float32", "float16", "bfloat16"],
        default=None,
        help="Project the size with the full-precision remainder in this dtype (default: as configured).",
    )
    summary_parser.add_argument("--markdown", action="store_true", help="Print a Markdown table.")
    args = parser.parse_args(argv)

    from .sizes import summary

    try:
        model, example = _load(args.path)
    except CheckpointError as e:
        print(f"{parser.prog} {args.command}: error: {_one_line(e, limit=1000)}", file=sys.stderr)
        return 1
    result = summary(model, example_inputs=example, export_dtype=args.export_dtype, print_fn=None)
    print(result.to_markdown() if args.markdown else result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
