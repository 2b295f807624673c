"""Importers of PEFT and AdapterHub checkpoints into the native artifact format.

    adapterserve import peft SRC OUT [--backbone DIR] [--labels a,b,c]
    adapterserve import adapterhub SRC OUT [--backbone DIR] [--no-head]

Importers read safetensors only. A pickle checkpoint (`.bin`) is converted only by this offline
command with `--allow-pickle` (restricted `weights_only` loading, with a warning); the server
never reads pickles. This module imports torch lazily, so registering the subcommand is cheap.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings

__all__ = ["add_import_parser", "import_adapterhub", "import_peft", "run_import"]


def import_peft(*args, **kwargs):
    """Convert a PEFT adapter directory into a native artifact (see adapters.formats.peft)."""
    from adapters.formats.peft import import_peft as impl

    return impl(*args, **kwargs)


def import_adapterhub(*args, **kwargs):
    """Convert an AdapterHub adapter directory into a native artifact (see adapters.formats.adapterhub)."""
    from adapters.formats.adapterhub import import_adapterhub as impl

    return impl(*args, **kwargs)


def add_import_parser(subparsers) -> argparse.ArgumentParser:
    """Register `import peft|adapterhub SRC OUT` on an argparse subparsers object."""
    p = subparsers.add_parser(
        "import",
        help="convert a PEFT or AdapterHub checkpoint into a native artifact directory",
        description=__doc__.splitlines()[0],
    )
    p.add_argument("format", choices=("peft", "adapterhub"), help="the checkpoint's library")
    p.add_argument("src", help="directory with the checkpoint (adapter_config.json and weights)")
    p.add_argument("out", help="directory to write (adapter_config.json + adapter.safetensors)")
    p.add_argument(
        "--backbone",
        help="the serving backbone's directory (default: $ADAPTERSERVE_BACKBONE, else the bundled MiniLM-L6)",
    )
    p.add_argument("--labels", help="comma-separated label names of a PEFT classifier head (default LABEL_i)")
    p.add_argument("--no-head", action="store_true", help="AdapterHub: leave the saved head out")
    p.add_argument(
        "--allow-pickle",
        action="store_true",
        help="also read pickle .bin checkpoints (only for files you trust); the output is safetensors",
    )
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT directory")
    p.set_defaults(func=run_import)
    return p


def run_import(args: argparse.Namespace) -> int:
    """Run `adapterserve import`: load the backbone's spec, convert, print the native config."""
    import os

    from adapters.backbone import load_backbone
    from store.errors import AdapterServeError

    path = args.backbone or os.environ.get("ADAPTERSERVE_BACKBONE") or None
    try:
        backbone = load_backbone(path, device="cpu", dtype="float32")
        spec = backbone.spec
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if args.format == "peft":
                labels = [s.strip() for s in args.labels.split(",")] if args.labels else None
                cfg = import_peft(
                    args.src,
                    args.out,
                    spec=spec,
                    labels=labels,
                    base=backbone.core,
                    allow_pickle=args.allow_pickle,
                    overwrite=args.overwrite,
                )
            else:
                cfg = import_adapterhub(
                    args.src,
                    args.out,
                    spec=spec,
                    allow_pickle=args.allow_pickle,
                    with_head=not args.no_head,
                    overwrite=args.overwrite,
                )
        for w in caught:
            print(f"adapterserve import: warning: {w.message}", file=sys.stderr)
    except (AdapterServeError, FileExistsError, FileNotFoundError, KeyError) as exc:
        print(f"adapterserve import: {getattr(exc, 'message', None) or exc}", file=sys.stderr)
        return 1
    print(json.dumps(cfg.model_dump(mode="json"), indent=2))
    return 0
