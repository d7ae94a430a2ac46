"""``blazil demo``: the whole system on this machine, with one command and nothing downloaded.

1. the five sample data sets and their models are made if missing (cached in ``$BLAZIL_HOME``);
2. each data set type is loaded through the dataset loader and run through its model;
3. a stream of simulated card and transfer transactions goes through fraud scoring into the embedded
   ledger (approve / review / reject), with reviews resolved by a reviewer;
4. text is generated through the three-stage pipeline (a small local random-weight checkpoint unless
   ``--model DIR`` names a real Qwen2 checkpoint);
5. ``/metrics`` is served throughout; a summary table ends the run.

``--quick`` runs every step on small inputs (what the tests use).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from blazil_ai.checks import port, positive_int

log = logging.getLogger(__name__)
TYPES = ("text", "timeseries", "features", "audio", "detection")
DEMO_DETECTOR_EPOCHS = {False: 8, True: 2}
MODEL_OF = {"text": "text", "timeseries": "timeseries", "features": "fraud", "audio": "audio", "detection": "detection"}


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``demo``."""
    p = sub.add_parser("demo", help="run the whole system end to end on this machine (nothing downloaded)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small inputs everywhere (about a minute)")
    p.add_argument("--model", help="a real Qwen2 checkpoint directory for the pipeline step "
                                   "(default: a small local random-weight checkpoint, whose text is noise)")
    p.add_argument("--transfers", type=positive_int,
                   help="simulated transactions to score (default 200000, quick 20000)")
    p.add_argument("--tokens", type=positive_int, help="tokens to generate (default 24, quick 8)")
    p.add_argument("--metrics-port", type=port, default=0, help="port of /metrics during the run (default: any free)")
    p.add_argument("--metrics-host", default="127.0.0.1",
                   help="address /metrics listens on (default 127.0.0.1; 0.0.0.0 lets a remote Prometheus scrape)")
    p.add_argument("--skip", action="append", default=[], choices=("data", "fraud", "pipeline"),
                   help="leave out a step (repeatable)")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    p.set_defaults(func=cmd_demo)


def _say(msg: str) -> None:
    print(f"[demo] {msg}", file=sys.stderr, flush=True)


class Summary:
    """Rows of the closing table: step, what was done, result, seconds."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def add(self, step: str, detail: str, result: str, seconds: float, **extra: Any) -> None:
        self.rows.append({"step": step, "detail": detail, "result": result, "seconds": round(seconds, 2), **extra})

    def table(self) -> str:
        heads = ("step", "detail", "result", "seconds")
        cells = [[str(r[h]) for h in heads] for r in self.rows]
        widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(heads)]
        line = "-+-".join("-" * w for w in widths)
        out = [" | ".join(h.ljust(w) for h, w in zip(heads, widths)), line]
        out += [" | ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
        return "\n".join(out)


def ensure_data_and_models(quick: bool, summary: Summary) -> tuple[Path, Path]:
    """Sample sets and the five models, made once into the cache (quick mode: small sets, own cache dirs)."""
    from blazil_ai.datasets.samples import make_samples
    from blazil_ai.models.build import SAMPLE_LAYOUT, build_model
    from blazil_ai.models.store import blazil_home

    home = blazil_home()
    samples = home / ("samples-quick" if quick else "samples")
    models = home / ("models-quick" if quick else "models")
    if not all((samples / SAMPLE_LAYOUT[MODEL_OF[t]]).exists() for t in TYPES):
        _say(f"making the five sample data sets in {samples} (first run only)")
        t0 = time.perf_counter()
        make_samples(samples, seed=0, small=quick)
        summary.add("samples", f"made 5 data sets in {samples}", "ok", time.perf_counter() - t0)
    else:
        summary.add("samples", f"cached in {samples}", "ok", 0.0)
    for t in TYPES:
        kind = MODEL_OF[t]
        if (models / f"{kind}.onnx").is_file():
            continue
        _say(f"building the {kind} model into {models} (first run only)")
        t0 = time.perf_counter()
        opts: dict[str, Any] = {}
        detail = f"{kind} model -> {path_name(kind)}"
        if kind == "detection":
            # A short training keeps a first run within minutes on two cores; 'blazil models build --type
            # detection' trains the full schedule.
            opts["epochs"] = DEMO_DETECTOR_EPOCHS[quick]
            detail += f" ({opts['epochs']} epochs, demo schedule)"
        path = build_model(kind, samples, models, seed=0, **opts)
        summary.add("build", detail, _quality(path), time.perf_counter() - t0)
    return samples, models


def path_name(kind: str) -> str:
    """File name of a model type's ONNX file."""
    return f"{kind}.onnx"


def _quality(onnx_path: Path) -> str:
    m = onnx_path.with_name(onnx_path.stem + ".metrics.json")
    if not m.is_file():
        return "built"
    data = json.loads(m.read_text())
    for part in (data.get("held_out"), data.get("detection"), data):
        for key in ("roc_auc", "accuracy", "map50", "mae", "parity_max_abs_diff_vs_sentence_transformers"):
            if isinstance(part, dict) and isinstance(part.get(key), (int, float)):
                return f"{key}={part[key]:.3f}"
    return "built"


def run_datasets(samples: Path, models: Path, quick: bool, summary: Summary) -> None:
    """Load each data set type with the loader and run its model over it."""
    from blazil_ai.models.build import SAMPLE_LAYOUT
    from blazil_ai.models.infer import run_inference

    limit = 64 if quick else 512
    for t in TYPES:
        kind = MODEL_OF[t]
        data = samples / SAMPLE_LAYOUT[kind]
        _say(f"{t}: loading {data} and running the {kind} model")
        t0 = time.perf_counter()
        with open(os.devnull, "w") as sink:
            s = run_inference(kind, data, model=models, out=sink.name, limit=limit, progress=True)
        result = f"{s['items']} items, {s['items_per_second']:.0f}/s"
        for key in ("accuracy", "mae", "detections"):
            if key in s:
                result += f", {key}={s[key]}"
        if "quality" in s:
            result += f", roc_auc={s['quality'].get('roc_auc', float('nan')):.3f}"
        if kind == "timeseries" and "naive_mae" in s:
            result += f" (naive {s['naive_mae']})"
        summary.add(f"data:{t}", f"{kind} model ({s['backend']})", result, time.perf_counter() - t0)


def run_fraud(models: Path, n: int, summary: Summary) -> dict[str, Any]:
    """Simulated transactions through fraud scoring into a fresh embedded ledger."""
    import numpy as np
    from tqdm import tqdm

    from blazil_ai.fraud import FraudService, Outcome
    from blazil_ai.fraud.simulate import open_accounts, push_stream, simulated_requests

    _say(f"fraud: simulating {n} transactions (labelled fraud patterns) and scoring them into the ledger")
    req, cols = simulated_requests(n, seed=7, fraud_rate=0.02)
    with tempfile.TemporaryDirectory(prefix="blazil-demo-ledger-") as tmp:
        t0 = time.perf_counter()
        with FraudService(tmp, models / "fraud.onnx", review_at=0.5, reject_at=0.9, review_timeout_s=600) as svc:
            accounts = open_accounts(svc.ledger, req)
            with tqdm(total=n, unit="transfer", desc="fraud-scored transfers", file=sys.stderr) as bar:
                outcome, score, wall, lat = push_stream(svc.submit, req, on_batch=bar.update)
            held = np.flatnonzero(outcome == Outcome.REVIEW)
            reviewed = []
            for i, approve in zip(held[:2].tolist(), (True, False)):
                d = svc.review(int(req["id"][i, 0]), approve)
                reviewed.append(f"{d.transfer_id} {d.review_state}")
            example = svc.decision(int(req["id"][int(np.argmax(outcome == Outcome.REJECTED)), 0]))
            counts = svc.store.counts()
        total = time.perf_counter() - t0
    y = cols["is_fraud"] == 1
    stopped = outcome != Outcome.APPROVED
    caught = int((stopped & y).sum())
    out = {"transfers": n, "accounts": accounts, "scored_per_second": round(n / wall), "wall_s": round(wall, 3),
           "p99_batch_latency_ms": round(float(np.percentile(lat, 99)) * 1e3, 2) if len(lat) else None,
           "approved": counts["approved"], "review": counts["review"], "rejected": counts["rejected"],
           "failed": counts["failed"], "fraud_caught": caught, "fraud_total": int(y.sum()),
           "false_alarms": int((stopped & ~y).sum()), "reviews_resolved": reviewed,
           "example_rejection": example.to_dict() if example else None}
    _say(f"fraud: {out['approved']} approved, {out['review']} held for review, {out['rejected']} rejected; "
         f"caught {caught}/{out['fraud_total']} fraudulent, {out['false_alarms']} false alarms; "
         f"{out['scored_per_second']:,} scored transfers/s")
    if example:
        _say(f"fraud: example rejection: {example.transfer_id} score {example.score:.3f} ({example.reason})")
    summary.add("fraud", f"{n} simulated transfers -> score -> ledger",
                f"{out['scored_per_second']:,}/s; approve {out['approved']}, review {out['review']}, "
                f"reject {out['rejected']}; fraud caught {caught}/{out['fraud_total']}", total)
    return out


def run_pipeline(model: str | None, tokens: int, summary: Summary) -> dict[str, Any]:
    """Generate text through the three-stage pipeline."""
    from blazil_ai.models.store import blazil_home
    from blazil_ai.pipeline.launcher import LocalPipeline, resolve_transport
    from blazil_ai.pipeline.sampling import SamplingParams

    if model is None:
        from blazil_ai.pipeline.random_model import save_tiny_checkpoint

        ckpt = blazil_home() / "pipeline" / "tiny-random-qwen2"
        if not (ckpt / "config.json").is_file():
            save_tiny_checkpoint(ckpt, seed=0)
        label = "small local RANDOM-weight Qwen2 checkpoint (its text is noise; --model DIR for a real one)"
    else:
        ckpt = Path(model)
        label = f"checkpoint {ckpt}"
    _say(f"pipeline: starting 3 stage processes for the {label}")
    t0 = time.perf_counter()
    prompt = "A payment ledger records"
    transport, why = resolve_transport("auto")
    _say(f"pipeline: stages talk over {transport} ({why})")
    with LocalPipeline(ckpt, transport=transport, threads=1) as pipe:
        client = pipe.client if pipe.client is not None else pipe.start()
        ranges = ", ".join(f"{s['stage']}={s['start']}:{s['stop']}" for s in client.stages_info)
        ids = client.encode(prompt)
        res = client.generate(ids, SamplingParams(max_new_tokens=tokens, temperature=0.0).validate())
    total = time.perf_counter() - t0
    text = client.decode(res.token_ids)
    _say(f"pipeline: stages {ranges}; prompt {prompt!r} -> {text!r}")
    out = {"checkpoint": str(ckpt), "random_weights": model is None, "stages": ranges, "prompt": prompt,
           "text": text, "tokens": len(res.token_ids), "decode_tokens_per_s": round(res.decode_tokens_per_s, 1)}
    summary.add("pipeline", f"3 stages over {transport}, " + ("random tiny checkpoint" if model is None else str(ckpt)),
                f"{len(res.token_ids)} tokens, {res.decode_tokens_per_s:.1f} tok/s", total)
    return out


def cmd_demo(args: argparse.Namespace) -> int:
    """Handler of ``blazil demo``."""
    import urllib.request

    from blazil_ai import metrics

    t_all = time.perf_counter()
    summary = Summary()
    server = metrics.serve(args.metrics_port, args.metrics_host)
    _say(f"serving /metrics at {server.url} while the demo runs")
    report: dict[str, Any] = {"quick": args.quick, "metrics_url": server.url}
    try:
        samples, models = ensure_data_and_models(args.quick, summary)
        if "data" not in args.skip:
            run_datasets(samples, models, args.quick, summary)
        if "fraud" not in args.skip:
            report["fraud"] = run_fraud(models, args.transfers or (20_000 if args.quick else 200_000), summary)
        if "pipeline" not in args.skip:
            report["pipeline"] = run_pipeline(args.model, args.tokens or (8 if args.quick else 24), summary)
        with urllib.request.urlopen(server.url, timeout=5) as r:
            body = r.read().decode()
        series = [ln for ln in body.splitlines() if ln.startswith("blazil_")]
        report["metrics_series"] = len(series)
        report["metrics_fraud_series"] = [ln for ln in series if ln.startswith("blazil_fraud_decisions_total")]
        summary.add("metrics", server.url, f"{len(series)} blazil_* series", 0.0)
    finally:
        server.close()
    report["seconds"] = round(time.perf_counter() - t_all, 1)
    summary.add("total", "", "done", time.perf_counter() - t_all)
    report["summary"] = summary.rows
    if args.json:
        print(json.dumps(report, default=str))
    else:
        print("\nBlazil AI demo summary\n" + summary.table())
    return 0
