"""Command line: `python -m stompp_hf summary <checkpoint dir>` prints the size table of a StoMPP checkpoint."""

from __future__ import annotations

import argparse
import json
import os
import sys


def _load(path: str):
    import transformers

    import stompp_hf  # noqa: F401  (registers the quantizer)

    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    if "architecture" in config and "pretrained_cfg" in config:  # timm's Hub layout (stompp_hf.integrations.timm)
        from .integrations.timm.io import from_pretrained
        from .integrations.timm.policy import example_input

        model = from_pretrained(path)
        return model, example_input(model, size=model.pretrained_cfg.get("input_size", (0, 224, 224))[-1])
    architectures = config.get("architectures") or []
    model_cls = getattr(transformers, architectures[0], None) if architectures else None
    if model_cls is None:
        model_cls = transformers.AutoModel
    return model_cls.from_pretrained(path), None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stompp_hf", description=__doc__)
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

    if not os.path.isfile(os.path.join(args.path, "config.json")):
        parser.error(f"{args.path!r} has no config.json; pass a folder written by `save_pretrained`.")
    from .sizes import summary

    model, example = _load(args.path)
    result = summary(model, example_inputs=example, export_dtype=args.export_dtype, print_fn=None)
    print(result.to_markdown() if args.markdown else result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
