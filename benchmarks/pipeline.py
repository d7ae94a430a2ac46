"""Benchmark: the three-stage pipeline against single-process Hugging Face ``generate`` (the anchor).

Both run the same random-weight checkpoint (the exact Qwen2.5-7B-Instruct shape by default, written
once to a cache directory) with the same dtype, device and threads. Runs are interleaved (anchor,
pipeline, anchor, ...) and medians reported. One JSON line per case:

* ``decode``      prefill seconds, decode ms/token, their ratios to the anchor, tokens identical or not
* ``memory``      the anchor's peak RSS (and CUDA peak) and each stage's, with the largest stage ratio
* ``concurrency`` aggregate tokens/s with N requests in flight (prompts included), and the ratio to one
                  request; beside it the batch's prefill seconds and its decode-only tokens/s

    python benchmarks/pipeline.py --config small --new-tokens 16       # CPU, quick
    python benchmarks/pipeline.py --config 7b --device cuda             # GPU, bf16
    python benchmarks/pipeline.py --config 7b --sequential --new-tokens 8 --reps 1   # 7B on a CPU host
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
    from blazil_ai.pipeline.stage import memory_peaks
    return memory_peaks(device)


def anchor_worker(args: argparse.Namespace) -> int:
    """Load the checkpoint into ``Qwen2ForCausalLM`` and answer generate requests (JSON lines on stdin)."""
    import torch
    from transformers import Qwen2ForCausalLM
    from transformers.generation.streamers import BaseStreamer

    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    model = Qwen2ForCausalLM.from_pretrained(args.anchor_worker, dtype=dtype, attn_implementation="sdpa",
                                             device_map=args.device if args.device != "cpu" else None).eval()

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
        ids = torch.tensor([req["prompt"]], device=args.device)
        clock = Clock()
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=req["new_tokens"], min_new_tokens=req["new_tokens"],
                                 repetition_penalty=1.0, streamer=clock, eos_token_id=None, pad_token_id=0)
        gen = out[0, ids.shape[1]:].tolist()
        first, last = clock.times[1], clock.times[-1]
        print(json.dumps({"ids": gen, "prefill_s": first - t0,
                          "decode_ms": 1000 * (last - first) / max(1, len(gen) - 1),
                          **peak_memory(args.device)}), flush=True)
    return 0


class Anchor:
    """The anchor process (kept separate so its peak RSS is its own)."""

    def __init__(self, ckpt: Path, args: argparse.Namespace) -> None:
        cmd = [sys.executable, __file__, "--anchor-worker", str(ckpt), "--device", args.device, "--dtype", args.dtype,
               "--threads", str(args.threads)]
        # The stages run with OMP_WAIT_POLICY=PASSIVE (set by the launcher); the anchor gets the same setting.
        env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the anchor process died while loading the model")

    def generate(self, prompt: list[int], n: int) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"prompt": prompt, "new_tokens": n}) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

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


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=sorted(CONFIGS), default="7b", help="model shape (default: Qwen2.5-7B)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="bfloat16", help="weights and activations dtype (default bfloat16)")
    p.add_argument("--threads", type=int, default=0, help="torch threads for the anchor and for each stage")
    p.add_argument("--transport", choices=("tcp", "aeron"), default="tcp")
    p.add_argument("--cache-dir", default=os.path.expanduser("~/.cache/blazil/bench"),
                   help="where the random checkpoint is written once")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--reps", type=int, default=3, help="interleaved repetitions (medians are reported)")
    p.add_argument("--concurrency", default="1,4,8", help="numbers of requests in flight")
    p.add_argument("--modes", default="auto",
                   help="pipelines to compare, comma-separated: auto, graphs (CUDA graphs for decode), eager, "
                        "plain (CPU bf16 weights not packed for oneDNN: BLAZIL_PACK_WEIGHTS=0)")
    p.add_argument("--log-dir", default=None, help="keep each stage's log here (one folder per mode)")
    p.add_argument("--out", default=None, help="also append the JSON lines to this file")
    p.add_argument("--sequential", action="store_true",
                   help="run the anchor's repetitions first and stop it before the stages start, for a host "
                        "whose memory holds the model only once (then decode timings are not interleaved)")
    p.add_argument("--anchor-worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.anchor_worker:
        return anchor_worker(args)

    import random

    from blazil_ai.pipeline import random_model
    from blazil_ai.pipeline.driver import LocalPipeline
    from blazil_ai.pipeline.sampling import SamplingParams

    if not args.threads and args.device == "cpu":
        args.threads = os.cpu_count() or 1
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
    rng = random.Random(0)
    vocab = min(config["vocab_size"], 150000)
    prompts = [[rng.randrange(vocab) for _ in range(args.prompt_tokens)] for _ in range(8)]
    greedy = SamplingParams(max_new_tokens=args.new_tokens, eos_token_ids=[-1])

    t0 = time.perf_counter()
    anchor: Anchor | None = Anchor(ckpt, args)
    anchor_load_s = time.perf_counter() - t0
    modes = args.modes.split(",")
    pipes: dict[str, LocalPipeline] = {}
    a_runs: list[dict[str, Any]] = []
    try:
        assert anchor is not None
        anchor.generate(prompts[0], 4)  # warm-up (allocator, kernels)
        if args.sequential:
            a_runs = [anchor.generate(prompts[0], args.new_tokens) for _ in range(args.reps)]
            anchor.close()
            anchor = None
        for mode in modes:
            t0 = time.perf_counter()
            pipes[mode] = LocalPipeline(ckpt, transport=args.transport, dtype=args.dtype, device=args.device,
                                        threads=args.threads, timeout=600, start_timeout=1200,
                                        log_dir=os.path.join(args.log_dir, mode) if args.log_dir else None,
                                        decode_graphs={"graphs": "on", "eager": "off"}.get(mode, "auto"),
                                        env={**os.environ, "BLAZIL_PACK_WEIGHTS": "0"} if mode == "plain" else None)
            pipes[mode].start()
            print(f"checkpoint {write_s:.0f}s, anchor load {anchor_load_s:.0f}s, {mode} stages load "
                  f"{time.perf_counter() - t0:.0f}s", file=sys.stderr, flush=True)
        for pipe in pipes.values():  # warm-up (allocator, kernels, graph captures)
            assert pipe.client is not None
            pipe.client.generate(prompts[0], SamplingParams(max_new_tokens=4, eos_token_ids=[-1]))
            pipe.client.generate_many(prompts[:8], SamplingParams(max_new_tokens=2, eos_token_ids=[-1]))
        p_runs: dict[str, list[Any]] = {m: [] for m in modes}
        for _ in range(args.reps):
            if anchor is not None:
                a_runs.append(anchor.generate(prompts[0], args.new_tokens))
            for mode, pipe in pipes.items():
                assert pipe.client is not None
                p_runs[mode].append(pipe.client.generate(prompts[0], greedy))
        a_dec = statistics.median(r["decode_ms"] for r in a_runs)
        a_pre = statistics.median(r["prefill_s"] for r in a_runs)
        base: dict[str, dict[str, Any]] = {}
        for mode, pipe in pipes.items():
            assert pipe.client is not None
            pongs = pipe.client.ping(10.0)
            graphs = [bool(s and s.get("decode_graphs")) for s in pongs]
            base[mode] = {**common, "mode": mode, "decode_graphs": graphs,
                          "packed_linears": [s.get("packed_linears") if s else None for s in pongs]}
            runs = p_runs[mode]
            p_dec = statistics.median(1000 / r.decode_tokens_per_s for r in runs)
            p_pre = statistics.median(r.prefill_s for r in runs)
            identical = all(a["ids"] == r.token_ids for a, r in zip(a_runs, runs))
            emit({"case": "decode", **base[mode], "anchor_prefill_s": round(a_pre, 4),
                  "pipeline_prefill_s": round(p_pre, 4), "prefill_ratio": round(p_pre / a_pre, 3),
                  "anchor_decode_ms_per_token": round(a_dec, 3), "pipeline_decode_ms_per_token": round(p_dec, 3),
                  "decode_ratio": round(p_dec / a_dec, 3), "anchor_tokens_per_s": round(1000 / a_dec, 2),
                  "pipeline_tokens_per_s": round(1000 / p_dec, 2), "tokens_identical": identical,
                  "goal": "decode_ratio <= 1.1", "reps": args.reps, "interleaved": not args.sequential}, out)
        a_mem = a_runs[-1]
        for mode, pipe in pipes.items():
            assert pipe.client is not None
            stages = pipe.client.ping(10.0)
            rec = {"case": "memory", **base[mode], "anchor_peak_rss_mb": round(a_mem["peak_rss_mb"], 1),
                   "stage_peak_rss_mb": [round(s["peak_rss_mb"], 1) if s else None for s in stages]}
            rec["max_stage_rss_ratio"] = round(max(r or 0 for r in rec["stage_peak_rss_mb"])
                                               / rec["anchor_peak_rss_mb"], 3)
            if "cuda_peak_mb" in a_mem:
                rec["anchor_cuda_peak_mb"] = round(a_mem["cuda_peak_mb"], 1)
                rec["stage_cuda_peak_mb"] = [round(s.get("cuda_peak_mb", 0), 1) if s else None for s in stages]
                rec["max_stage_cuda_ratio"] = round(max(r or 0 for r in rec["stage_cuda_peak_mb"])
                                                    / rec["anchor_cuda_peak_mb"], 3)
            rec["goal"] = "each stage <= 0.4 x anchor"
            emit(rec, out)
        concurrency = [int(c) for c in args.concurrency.split(",")]
        rates: dict[str, dict[int, list[float]]] = {m: {n: [] for n in concurrency} for m in modes}
        # The same runs split in two: all prompts through the stages (the batch's first tokens), then
        # the decode steps alone, so a figure bound by prefill compute is told from one bound by decode.
        prefills: dict[str, dict[int, list[float]]] = {m: {n: [] for n in concurrency} for m in modes}
        decodes: dict[str, dict[int, list[float]]] = {m: {n: [] for n in concurrency} for m in modes}
        for _ in range(args.reps):
            for n in concurrency:
                for mode, pipe in pipes.items():
                    assert pipe.client is not None
                    t = time.perf_counter()
                    results = pipe.client.generate_many(prompts[:n], greedy)
                    rates[mode][n].append(sum(len(r.token_ids) for r in results) / (time.perf_counter() - t))
                    first = max(r.first_token_at for r in results)
                    prefills[mode][n].append(first - t)
                    span = max(r.last_token_at for r in results) - first
                    decodes[mode][n].append(sum(len(r.token_ids) - 1 for r in results) / span if span > 0 else 0.0)
        for mode in modes:
            single = statistics.median(rates[mode][concurrency[0]])
            single_dec = statistics.median(decodes[mode][concurrency[0]])
            for n in concurrency:
                med = statistics.median(rates[mode][n])
                dec = statistics.median(decodes[mode][n])
                emit({"case": "concurrency", **base[mode], "requests": n, "pipeline_tokens_per_s": round(med, 2),
                      "single_request_tokens_per_s": round(single, 2), "ratio_to_single": round(med / single, 3),
                      "prefill_s": round(statistics.median(prefills[mode][n]), 3),
                      "decode_tokens_per_s": round(dec, 2),
                      "decode_ratio_to_single": round(dec / single_dec, 3) if single_dec else None,
                      "anchor_tokens_per_s": round(1000 / a_dec, 2),
                      "ratio_to_anchor": round(med / (1000 / a_dec), 3),
                      "goal": "8 requests >= 4x single", "reps": args.reps}, out)
    finally:
        for pipe in pipes.values():
            pipe.stop()
        if anchor is not None:
            anchor.close()
        if out is not None:
            out.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
