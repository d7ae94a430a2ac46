"""Benchmark: the three-stage pipeline against single-process Hugging Face ``generate`` (the anchor).

Both run the same random-weight checkpoint (the exact Qwen2.5-7B-Instruct shape by default, written
once to a cache directory) with the same dtype, device and threads. Two anchors, each in its own
process: ``eager`` (plain ``generate``, the reference for token identity) and ``compiled``
(``generate`` with ``cache_implementation="static"``, which Hugging Face compiles with
``torch.compile``: the fastest single-process setup a user can pick; on a CPU it is asked for with a
compile config, and reported as unavailable if it does not run). Runs are interleaved (anchors,
pipelines, anchors, ...) and medians reported. One JSON line per case:

* ``decode``      one request: prefill seconds, decode ms/token, ratios to each anchor, tokens identical
* ``memory``      the eager anchor's peak RSS (and CUDA peak) and each stage's, with the largest stage ratio
* ``concurrency`` N requests in flight against each anchor generating the same N prompts as one batch:
                  aggregate tokens/s (prompts included), decode-only tokens/s, ratios, tokens identical to
                  the eager anchor's batch

A mode that asks for CUDA graphs (``graphs``, or ``auto`` on a GPU) whose stages do not all decode
through graphs is reported with ``"error"`` and makes the run exit with status 1.

    python benchmarks/pipeline.py --config small --new-tokens 16       # CPU, quick
    python benchmarks/pipeline.py --config 7b --device cuda             # GPU, bf16
    python benchmarks/pipeline.py --config 7b --sequential --new-tokens 8 --reps 1 --anchors eager  # 7B, CPU
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONFIGS = {"7b": "QWEN25_7B_INSTRUCT", "small": "SMALL", "tiny": "TINY"}


def peak_memory(device: str) -> dict[str, float]:
    from blazil_ai.pipeline.devices import memory_peaks
    return memory_peaks(device)


def anchor_worker(args: argparse.Namespace) -> int:
    """Load the checkpoint into ``Qwen2ForCausalLM`` and answer generate requests (JSON lines on stdin).

    A request is a batch of prompts of one length (no padding), so a batch of N is what one ``generate``
    call with N rows computes. With ``--compiled`` the anchor uses the static cache, which Hugging
    Face compiles (on a CPU only when asked with a compile config).
    """
    import torch
    from transformers import Qwen2ForCausalLM
    from transformers.generation.streamers import BaseStreamer

    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    model = Qwen2ForCausalLM.from_pretrained(args.anchor_worker, dtype=dtype, attn_implementation="sdpa",
                                             device_map=args.device if args.device != "cpu" else None).eval()
    extra: dict[str, Any] = {}
    if args.compiled:
        from transformers import GenerationConfig
        from transformers.generation.configuration_utils import CompileConfig

        compile_config = CompileConfig()
        if args.device == "cpu":
            compile_config._compile_all_devices = True  # type: ignore[assignment]  # Hugging Face compiles on accelerators unless told
        extra["generation_config"] = GenerationConfig(cache_implementation="static", compile_config=compile_config,
                                                      do_sample=False)
        extra["cache_implementation"] = "static"

    class Clock(BaseStreamer):
        def __init__(self) -> None:
            self.times: list[float] = []

        def put(self, value: Any) -> None:
            value.tolist()  # waits for the GPU: the token exists now
            self.times.append(time.perf_counter())

        def end(self) -> None:
            pass

    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        ids = torch.tensor(req["prompts"], device=args.device)
        clock = Clock()
        t0 = time.perf_counter()
        try:
            with torch.inference_mode():
                out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                     max_new_tokens=req["new_tokens"], min_new_tokens=req["new_tokens"],
                                     repetition_penalty=1.0, streamer=clock, eos_token_id=None, pad_token_id=0,
                                     **extra)
        except Exception as e:  # e.g. torch.compile unavailable here: reported, not fatal
            print(json.dumps({"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}),
                  flush=True)
            continue
        gen = out[:, ids.shape[1]:].tolist()
        first, last = clock.times[1], clock.times[-1]
        steps = max(1, len(gen[0]) - 1)
        print(json.dumps({"ids": gen, "prefill_s": first - t0, "total_s": last - t0,
                          "decode_ms": 1000 * (last - first) / steps, **peak_memory(args.device)}), flush=True)
    return 0


class Anchor:
    """An anchor process (kept separate so its peak RSS is its own)."""

    def __init__(self, ckpt: Path, args: argparse.Namespace, kind: str) -> None:
        self.kind = kind
        cmd = [sys.executable, __file__, "--anchor-worker", str(ckpt), "--device", args.device, "--dtype", args.dtype,
               "--threads", str(args.threads)] + (["--compiled"] if kind == "compiled" else [])
        # The stages run with OMP_WAIT_POLICY=PASSIVE (set by the launcher); the anchor gets the same setting.
        env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the {kind} anchor process died while loading the model")
        self.error: str | None = None

    def generate(self, prompts: list[list[int]], n: int) -> dict[str, Any] | None:
        """One batched ``generate``; None (and :attr:`error` set) if this anchor cannot run it."""
        if self.error is not None:
            return None
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"prompts": prompts, "new_tokens": n}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            self.error = f"the {self.kind} anchor process exited"
            return None
        res = json.loads(line)
        if "error" in res:
            self.error = res["error"]
            print(f"{self.kind} anchor: {self.error}", file=sys.stderr, flush=True)
            return None
        return res

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def emit(record: dict[str, Any], out: Any) -> None:
    line = json.dumps(record)
    print(line, flush=True)
    if out is not None:
        out.write(line + "\n")
        out.flush()


def median_of(runs: list[dict[str, Any] | None], key: str) -> float | None:
    values = [r[key] for r in runs if r is not None]
    return statistics.median(values) if values else None


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def hop_budget(client: Any, prompt: list[int], new_tokens: int) -> dict[str, Any]:
    """Per decode step of one request: each stage's forward and message handling, and what is left (the hops).

    From the stages' own counters (``work`` in their pings), read around a request of ``new_tokens`` and
    one of a single token (its prefill), so the difference is the decode steps alone.
    """
    from blazil_ai.pipeline.sampling import SamplingParams

    def work() -> list[dict[str, float]]:
        return [dict((p or {}).get("work") or {}) for p in client.ping(10.0)]

    def spent(n: int) -> tuple[list[dict[str, float]], Any]:
        before = work()
        res = client.generate(prompt, SamplingParams(max_new_tokens=n, eos_token_ids=[-1]))
        after = work()
        return [{k: a.get(k, 0.0) - b.get(k, 0.0) for k in ("steps", "forward_s", "busy_s")}
                for a, b in zip(after, before)], res

    full, res = spent(new_tokens)
    first, _ = spent(1)
    steps = new_tokens - 1
    stages = []
    for f, o in zip(full, first):
        fwd = (f["forward_s"] - o["forward_s"]) / steps * 1000
        busy = (f["busy_s"] - o["busy_s"]) / steps * 1000
        stages.append({"forward_ms": round(fwd, 3), "handling_ms": round(busy - fwd, 3)})
    per_token = 1000 / res.decode_tokens_per_s if res.decode_tokens_per_s else None
    in_stages = sum(s["forward_ms"] + s["handling_ms"] for s in stages)
    return {"ms_per_token": round(per_token, 3) if per_token else None, "stages": stages,
            "hops_and_wakeups_ms": round(per_token - in_stages, 3) if per_token else None,
            "note": "forward = the stage's layers until the result is on the host; handling = the rest of its "
                    "work on the messages (decode, batch, encode, send); hops = the remainder of a token's time"}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=sorted(CONFIGS), default="7b", help="model shape (default: Qwen2.5-7B)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="bfloat16", help="weights and activations dtype (default bfloat16)")
    p.add_argument("--threads", type=int, default=0, help="torch threads for the anchors and for each stage")
    p.add_argument("--transport", choices=("auto", "tcp", "aeron"), default="auto",
                   help="stage transport (default auto, as blazil generate: Aeron IPC when built, else TCP)")
    p.add_argument("--cache-dir", default=os.path.expanduser("~/.cache/blazil/bench"),
                   help="where the random checkpoint is written once")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--reps", type=int, default=3, help="interleaved repetitions (medians are reported)")
    p.add_argument("--concurrency", default="1,8,32", help="numbers of requests in flight")
    p.add_argument("--anchors", default="eager,compiled",
                   help="anchors to run: eager (plain generate, the token reference) and/or compiled "
                        "(static cache + torch.compile)")
    p.add_argument("--modes", default="auto",
                   help="pipelines to compare, comma-separated: auto, graphs (CUDA graphs for decode), eager, "
                        "plain (CPU bf16 weights not packed for oneDNN: BLAZIL_PACK_WEIGHTS=0)")
    p.add_argument("--log-dir", default=None, help="keep each stage's log here (one folder per mode)")
    p.add_argument("--out", default=None, help="also append the JSON lines to this file")
    p.add_argument("--sequential", action="store_true",
                   help="run the anchors' repetitions first and stop them before the stages start, for a host "
                        "whose memory holds the model only once (then timings are not interleaved)")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds after which no further repetition starts (at least one always runs): the "
                        "cases are then reported from the repetitions done, and 'reps' says how many")
    p.add_argument("--anchor-worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--compiled", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.anchor_worker:
        return anchor_worker(args)

    import random

    from blazil_ai.pipeline import random_model
    from blazil_ai.pipeline.launcher import LocalPipeline, resolve_transport
    from blazil_ai.pipeline.sampling import SamplingParams

    started = time.perf_counter()
    if not args.threads and args.device == "cpu":
        args.threads = os.cpu_count() or 1
    args.transport, why = resolve_transport(args.transport)
    print(f"transport {args.transport} ({why})", file=sys.stderr, flush=True)
    config = dict(getattr(random_model, CONFIGS[args.config]))
    ckpt = Path(args.cache_dir) / f"qwen2-{args.config}-{args.dtype}"
    t0 = time.perf_counter()
    random_model.write_random_checkpoint(ckpt, config, dtype=args.dtype, device=args.device)
    write_s = time.perf_counter() - t0
    out = open(args.out, "a") if args.out else None  # noqa: SIM115
    common = {"config": args.config, "device": args.device, "dtype": args.dtype, "threads": args.threads,
              "transport": args.transport, "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens}
    if args.device.startswith("cuda"):
        import torch
        common["gpu"] = torch.cuda.get_device_name(0)
    concurrency = [int(c) for c in args.concurrency.split(",")]
    rng = random.Random(0)
    vocab = min(config["vocab_size"], 150000)
    prompts = [[rng.randrange(vocab) for _ in range(args.prompt_tokens)] for _ in range(max(concurrency + [1]))]
    greedy = SamplingParams(max_new_tokens=args.new_tokens, eos_token_ids=[-1])
    kinds = [k for k in args.anchors.split(",") if k]
    if "eager" not in kinds:
        kinds.insert(0, "eager")  # the reference for token identity
    sizes = sorted({1, *concurrency})

    anchors: dict[str, Anchor] = {}
    # a_runs[kind][n]: the anchor generating n prompts as one batch, once per repetition
    a_runs: dict[str, dict[int, list[dict[str, Any] | None]]] = {k: {n: [] for n in sizes} for k in kinds}
    modes = args.modes.split(",")
    pipes: dict[str, LocalPipeline] = {}
    failed: list[str] = []

    def anchor_rep() -> None:
        for kind, anchor in anchors.items():
            for n in sizes:
                a_runs[kind][n].append(anchor.generate(prompts[:n], args.new_tokens))

    try:
        for kind in kinds:
            t0 = time.perf_counter()
            anchors[kind] = Anchor(ckpt, args, kind)
            for n in sizes:  # warm-up: allocator, kernels, and for the compiled anchor one compile per shape
                anchors[kind].generate(prompts[:n], args.new_tokens)
            print(f"{kind} anchor ready in {time.perf_counter() - t0:.0f}s"
                  + (f" (unavailable: {anchors[kind].error})" if anchors[kind].error else ""),
                  file=sys.stderr, flush=True)
            if args.sequential:
                for _ in range(args.reps):  # only this anchor is loaded now: the others ran and were closed
                    anchor_rep()
                anchors.pop(kind).close()
        for mode in modes:
            t0 = time.perf_counter()
            pipes[mode] = LocalPipeline(ckpt, transport=args.transport, dtype=args.dtype, device=args.device,
                                        threads=args.threads, timeout=600, start_timeout=1200,
                                        log_dir=os.path.join(args.log_dir, mode) if args.log_dir else None,
                                        decode_graphs={"graphs": "on", "eager": "off"}.get(mode, "auto"),
                                        env={**os.environ, "BLAZIL_PACK_WEIGHTS": "0"} if mode == "plain" else None)
            pipes[mode].start()
            print(f"checkpoint {write_s:.0f}s, {mode} stages load {time.perf_counter() - t0:.0f}s",
                  file=sys.stderr, flush=True)
        for pipe in pipes.values():  # warm-up (allocator, kernels, graph captures for every batch size)
            assert pipe.client is not None
            for n in sizes:
                pipe.client.generate_many(prompts[:n], greedy)
        p_runs: dict[str, dict[int, list[list[Any]]]] = {m: {n: [] for n in sizes} for m in modes}
        walls: dict[str, dict[int, list[float]]] = {m: {n: [] for n in sizes} for m in modes}
        done_reps = 0
        for _ in range(args.reps):
            if done_reps and args.time_budget is not None and time.perf_counter() - started > args.time_budget:
                print(f"time budget of {args.time_budget:.0f}s spent: {done_reps} of {args.reps} repetitions",
                      file=sys.stderr, flush=True)
                break
            done_reps += 1
            anchor_rep()
            for n in sizes:
                for mode, pipe in pipes.items():
                    assert pipe.client is not None
                    t = time.perf_counter()
                    p_runs[mode][n].append(pipe.client.generate_many(prompts[:n], greedy))
                    walls[mode][n].append(time.perf_counter() - t)
        eager = a_runs["eager"]
        for mode, pipe in pipes.items():
            assert pipe.client is not None
            pongs = pipe.client.ping(10.0)
            graphs = [bool(s and s.get("decode_graphs")) for s in pongs]
            base: dict[str, Any] = {**common, "mode": mode, "decode_graphs": graphs,
                                    "packed_linears": [s.get("packed_linears") if s else None for s in pongs]}
            wants_graphs = mode == "graphs" or (mode == "auto" and args.device.startswith("cuda"))
            if wants_graphs and not all(graphs):
                base["error"] = ("CUDA graphs were asked for but not every stage decodes through them: "
                                 + "; ".join(f"stage {i + 1}: {s.get('decode_graphs_failure', 'off')}"
                                             for i, s in enumerate(pongs) if s and not s.get("decode_graphs")))
                failed.append(mode)
            # decode: one request
            singles = [runs[0] for runs in p_runs[mode][1]]
            p_dec = statistics.median(1000 / r.decode_tokens_per_s for r in singles)
            p_pre = statistics.median(r.prefill_s for r in singles)
            rec: dict[str, Any] = {"case": "decode", **base, "pipeline_prefill_s": round(p_pre, 4),
                                   "pipeline_decode_ms_per_token": round(p_dec, 3),
                                   "pipeline_tokens_per_s": round(1000 / p_dec, 2)}
            for kind in kinds:
                a_dec, a_pre = median_of(a_runs[kind][1], "decode_ms"), median_of(a_runs[kind][1], "prefill_s")
                rec[f"{kind}_anchor_prefill_s"] = round(a_pre, 4) if a_pre is not None else None
                rec[f"{kind}_anchor_decode_ms_per_token"] = round(a_dec, 3) if a_dec is not None else None
                rec[f"{kind}_anchor_tokens_per_s"] = round(1000 / a_dec, 2) if a_dec else None
                rec[f"decode_ratio_to_{kind}"] = ratio(p_dec, a_dec)  # ms per token: lower is better
                if kind in anchors and anchors[kind].error:
                    rec[f"{kind}_anchor_error"] = anchors[kind].error
            rec["tokens_identical"] = all(a is not None and a["ids"][0] == r.token_ids
                                          for a, r in zip(eager[1], singles))
            rec.update({"goal": "decode ms/token <= 1.1x eager anchor (CPU); >= 1.0x compiled anchor's tokens/s "
                                "(GPU)", "reps": done_reps, "interleaved": not args.sequential})
            emit(rec, out)
            # memory
            a_mem = next((r for r in reversed(eager[1]) if r is not None), None)
            if a_mem is not None:
                mem = {"case": "memory", **base, "anchor_peak_rss_mb": round(a_mem["peak_rss_mb"], 1),
                       "stage_peak_rss_mb": [round(s["peak_rss_mb"], 1) if s else None for s in pongs]}
                mem["max_stage_rss_ratio"] = round(max(r or 0 for r in mem["stage_peak_rss_mb"])
                                                   / mem["anchor_peak_rss_mb"], 3)
                if "cuda_peak_mb" in a_mem:
                    mem["anchor_cuda_peak_mb"] = round(a_mem["cuda_peak_mb"], 1)
                    mem["stage_cuda_peak_mb"] = [round(s.get("cuda_peak_mb", 0), 1) if s else None for s in pongs]
                    mem["max_stage_cuda_ratio"] = round(max(r or 0 for r in mem["stage_cuda_peak_mb"])
                                                        / mem["anchor_cuda_peak_mb"], 3)
                mem["goal"] = "each stage <= 0.4 x anchor"
                emit(mem, out)
            # concurrency: N requests in flight against each anchor's batch of N
            single_rate = statistics.median(1 / w * args.new_tokens for w in walls[mode][1])
            for n in concurrency:
                rates, decodes, prefills = [], [], []
                for results, wall in zip(p_runs[mode][n], walls[mode][n]):
                    rates.append(sum(len(r.token_ids) for r in results) / wall)
                    first = max(r.first_token_at for r in results)
                    prefills.append(first - min(r.submitted for r in results))
                    span = max(r.last_token_at for r in results) - first
                    decodes.append(sum(len(r.token_ids) - 1 for r in results) / span if span > 0 else 0.0)
                med, dec = statistics.median(rates), statistics.median(decodes)
                conc: dict[str, Any] = {"case": "concurrency", **base, "requests": n,
                                        "pipeline_tokens_per_s": round(med, 2),
                                        "pipeline_decode_tokens_per_s": round(dec, 2),
                                        "prefill_s": round(statistics.median(prefills), 3),
                                        "ratio_to_single": round(med / single_rate, 3)}
                for kind in kinds:
                    total = median_of(a_runs[kind][n], "total_s")
                    a_rate = n * args.new_tokens / total if total else None
                    a_step = median_of(a_runs[kind][n], "decode_ms")
                    a_dec_rate = n * 1000 / a_step if a_step else None
                    conc[f"{kind}_anchor_tokens_per_s"] = round(a_rate, 2) if a_rate else None
                    conc[f"{kind}_anchor_decode_tokens_per_s"] = round(a_dec_rate, 2) if a_dec_rate else None
                    conc[f"ratio_to_{kind}"] = ratio(med, a_rate)  # tokens/s: higher is better
                    conc[f"decode_ratio_to_{kind}"] = ratio(dec, a_dec_rate)
                conc["tokens_identical"] = all(
                    a is not None and [r.token_ids for r in results] == a["ids"]
                    for a, results in zip(eager[n], p_runs[mode][n]))
                conc.update({"goal": "N requests >= 1.0x compiled anchor at batch N (GPU; 32: >= 0.9x)",
                             "reps": done_reps})
                emit(conc, out)
        for mode, pipe in pipes.items():  # where one request's decode step spends its time, stage by stage
            emit({"case": "budget", **common, "mode": mode, **hop_budget(pipe.client, prompts[0], args.new_tokens)},
                 out)
    finally:
        for pipe in pipes.values():
            pipe.stop()
        for anchor in anchors.values():
            anchor.close()
        if out is not None:
            out.close()
    if failed:
        print(f"benchmark: modes {', '.join(failed)} asked for CUDA graphs and did not get them", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
