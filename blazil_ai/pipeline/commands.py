"""``blazil generate`` (a local three-stage pipeline) and ``blazil stage`` (one stage, for multi-host runs)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from blazil_ai.checks import (
    channel_uri,
    check_uri,
    device,
    nonneg_int,
    port,
    positive_float,
    positive_int,
    stream_id,
)

DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")
STAGES = 3  # blazil generate runs (or connects to) a ring of three stages


def stage_streams(text: str) -> list[int]:
    """``argparse`` type of ``--connect-streams``: one stream id per stage, comma-separated."""
    parts = [p.strip() for p in text.split(",")]
    if len(parts) != STAGES:
        raise argparse.ArgumentTypeError(f"{len(parts)} stream id(s) given; give {STAGES}, one per stage, in ring "
                                         "order (e.g. 101,102,103)")
    out = []
    for i, p in enumerate(parts, 1):
        try:
            out.append(stream_id(p))
        except argparse.ArgumentTypeError as e:
            raise argparse.ArgumentTypeError(f"stage {i}: {e}") from None
    return out


def stage_uris(text: str) -> list[str]:
    """``argparse`` type of ``--connect``: exactly one channel URI per stage, comma-separated."""
    uris = [u.strip() for u in text.split(",")]
    if len(uris) != STAGES:
        raise argparse.ArgumentTypeError(f"{len(uris)} URI(s) given; give {STAGES}, one per stage, in ring order "
                                         "(tcp://host-a:7001,tcp://host-b:7002,tcp://host-c:7003)")
    for i, u in enumerate(uris, 1):
        try:
            check_uri(u)
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"stage {i}: {e}") from None
    return uris


GENERATE_EPILOG = """\
examples:
  blazil generate --model ./Qwen2.5-7B-Instruct --chat "Write a haiku about ledgers"
  blazil generate --model ./qwen --temperature 0.7 --top-p 0.8 --seed 1 "Once upon a time"
  blazil generate --model ./qwen --split 8,18 --transport aeron --json "2+2="

--temperature 0 is greedy (token-identical to Hugging Face generate). Without sampling flags the
checkpoint's generation_config.json decides (greedy when it has none).
"""

STAGE_EPILOG = """\
three hosts (stage 3 sends sampled tokens back to stage 1):
  host-a$ blazil stage --stage 1 --model ./qwen --layers 0:10  --listen tcp://0.0.0.0:7001 --next tcp://host-b:7002
  host-b$ blazil stage --stage 2 --model ./qwen --layers 10:20 --listen tcp://0.0.0.0:7002 --next tcp://host-c:7003
  host-c$ blazil stage --stage 3 --model ./qwen --layers 20:28 --listen tcp://0.0.0.0:7003 --next tcp://host-a:7001
  client$ blazil generate --model ./qwen --connect tcp://host-a:7001,tcp://host-b:7002,tcp://host-c:7003 \\
              --listen tcp://0.0.0.0:7000 --reply-to tcp://client:7000 "Hello"
"""


def pipeline_arguments(p: argparse.ArgumentParser, receiver: str) -> None:
    """The options of a command that starts the three stages or connects to running ones (generate, llm serve).

    Each is checked as it is parsed, so a bad value stops the command before any stage starts.
    """
    p.add_argument("--transport", choices=("auto", "tcp", "aeron"), default="auto",
                   help="channels between stages: aeron (IPC through a media driver it starts), tcp, or auto "
                        "(default: aeron when its build is there, else tcp)")
    p.add_argument("--split", default=None, help="first layer of stages 2 and 3, e.g. 10,20 (default: thirds)")
    p.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                   help="float32, bfloat16, float16 or auto (the checkpoint's)")
    p.add_argument("--device", default="cpu", type=device, help="torch device for the stages (cpu, cuda)")
    p.add_argument("--threads", type=nonneg_int, default=0, help="torch threads per stage (0 = torch's default)")
    p.add_argument("--decode-graphs", choices=("auto", "on", "off"), default="auto",
                   help="CUDA graphs for decode steps (auto = on when --device is a GPU); with 'on' a stage "
                        "that cannot capture them fails instead of decoding eagerly")
    p.add_argument("--timeout", type=positive_float, default=120.0,
                   help="fail a request when no token arrives for this many seconds (default 120)")
    p.add_argument("--connect", default=None, type=stage_uris,
                   help="use running stages instead of starting them: comma-separated URIs of stages 1,2,3")
    p.add_argument("--connect-streams", default=None, type=stage_streams,
                   help="with --connect: the stages' stream ids (their --listen-stream), comma-separated "
                        "(default 1,1,1; stages on one host over aeron:ipc share the channel and differ by "
                        "stream, e.g. 101,102,103 as blazil generate starts them)")
    p.add_argument("--listen", default="tcp://127.0.0.1:0", type=channel_uri,
                   help=f"where {receiver} receives tokens (with --connect)")
    p.add_argument("--listen-stream", default=None, type=stream_id,
                   help="stream id of --listen (default 1; on aeron:ipc one of this process's own, so that "
                        "clients of one media driver do not share it)")
    p.add_argument("--reply-to", default=None, type=channel_uri,
                   help="the address stages use to reach --listen, when it differs (e.g. tcp://client-host:7000)")


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``generate`` and ``stage`` to the ``blazil`` command."""
    g = sub.add_parser("generate", help="generate text with a Qwen2 model split over three stage processes",
                       description="Start a local three-stage pipeline for a Qwen2 checkpoint (or connect to "
                                   "running stages), generate from PROMPT and stream the text as it comes.",
                       epilog=GENERATE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    g.add_argument("prompt", nargs="?", help="prompt text (default: read standard input)")
    g.add_argument("--model", required=True, help="Hugging Face Qwen2 checkpoint directory")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.add_argument("--system", default=None, help="system message for --chat")
    g.add_argument("--max-new-tokens", type=positive_int, default=128, help="most tokens to generate (default 128)")
    g.add_argument("--temperature", type=float, default=None, help="0 = greedy; > 0 samples")
    g.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens (0 = off)")
    g.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass (1 = off)")
    g.add_argument("--repetition-penalty", type=float, default=None, help="Hugging Face repetition penalty (1 = off)")
    g.add_argument("--seed", type=int, default=None, help="seed that makes sampling reproducible")
    g.add_argument("--stop", action="append", default=[], help="stop when this text appears (repeatable)")
    pipeline_arguments(g, "this client")
    g.add_argument("--json", action="store_true", help="print one JSON object (token_ids, text, timings) at the end")
    g.set_defaults(func=cmd_generate)

    s = sub.add_parser("stage", help="run one pipeline stage (for multi-host pipelines)",
                       description="Load layers START:STOP of a Qwen2 checkpoint and serve them as one stage "
                                   "of a pipeline ring.", epilog=STAGE_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    stage_arguments(s)
    s.set_defaults(func=cmd_stage)


def stage_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Options of one stage process (``blazil stage``; launchers start ``python -m blazil_ai stage``).

    Kept here, away from torch, so that ``blazil --help`` does not import it.
    """
    p.add_argument("--stage", type=positive_int, required=True,
                   help="this stage's number (1 = embeddings, last = head)")
    p.add_argument("--model", required=True, help="Hugging Face checkpoint directory (config.json + safetensors)")
    p.add_argument("--layers", required=True, help="layers this stage holds, START:STOP (e.g. 0:10)")
    p.add_argument("--listen", required=True, type=channel_uri,
                   help="URI this stage receives on (tcp://0.0.0.0:7001, aeron:ipc, ...)")
    p.add_argument("--next", required=True, type=channel_uri,
                   help="URI of the next stage (the last stage's next is stage 1)")
    p.add_argument("--listen-stream", type=stream_id, default=1, help="stream id to receive on (default 1)")
    p.add_argument("--next-stream", type=stream_id, default=1, help="stream id of the next stage (default 1)")
    p.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                   help="float32, bfloat16, float16 or auto (the checkpoint's)")
    p.add_argument("--device", default="cpu", type=device, help="torch device: cpu, cuda, cuda:1 ...")
    p.add_argument("--threads", type=nonneg_int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--decode-graphs", choices=("auto", "on", "off"), default="auto",
                   help="replay each decode step (all of the stage's layers) as one CUDA graph (auto = on a GPU)")
    p.add_argument("--heartbeat", type=positive_float, default=1.0,
                   help="while one forward runs longer than this many seconds (a long prompt), tell the "
                        "waiting clients every so often that this stage is busy, not dead (default 1)")
    p.add_argument("--metrics-port", type=port, default=None, help="serve Prometheus /metrics on this port")
    p.add_argument("--metrics-host", default="127.0.0.1",
                   help="address /metrics listens on (default 127.0.0.1; 0.0.0.0 lets a remote Prometheus scrape)")
    p.add_argument("--exit-with-parent", action="store_true",
                   help="exit when the process that started this stage exits (used by blazil generate)")
    return p


def cmd_stage(args: argparse.Namespace) -> int:
    """Handler of ``blazil stage``."""
    from blazil_ai.pipeline.stage import run_stage
    return run_stage(args)


def _params(args: argparse.Namespace) -> Any:
    from blazil_ai.pipeline.sampling import SamplingParams, eos_ids_of, generation_defaults

    d: dict[str, Any] = generation_defaults(args.model)
    for key in ("temperature", "top_k", "top_p", "repetition_penalty"):
        v = getattr(args, key)
        if v is not None:
            d[key] = v
    if args.temperature is not None and args.temperature == 0:
        d = {"temperature": 0.0, "repetition_penalty": d.get("repetition_penalty", 1.0)
             if args.repetition_penalty is not None else 1.0}
    return SamplingParams(max_new_tokens=args.max_new_tokens, seed=args.seed, stop=list(args.stop),
                          eos_token_ids=eos_ids_of(args.model), **d).validate()


class _Streamer:
    """Prints the text of new tokens as they arrive (holding back half a UTF-8 character)."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.ids: list[int] = []
        self.shown = 0
        self.status_shown = False

    def busy(self, stage: int, seconds: float) -> None:
        """A stage is in a long forward (the prompt, on a slow host): say so on a terminal."""
        if not self.ids and sys.stderr.isatty():
            sys.stderr.write(f"\r\033[Kstage {stage} working on the prompt ({seconds:.0f} s)")
            sys.stderr.flush()
            self.status_shown = True

    def __call__(self, rid: str, token: int) -> None:
        if self.status_shown:
            sys.stderr.write("\r\033[K")
            self.status_shown = False
        self.ids.append(token)
        text = self.client.decode(self.ids)
        if text.endswith("\ufffd"):
            return
        sys.stdout.write(text[self.shown:])
        sys.stdout.flush()
        self.shown = len(text)


def _check_chat_template(model: str) -> None:
    from transformers import AutoTokenizer

    from blazil_ai.errors import ConfigError

    if not (Path(model) / "tokenizer.json").is_file():
        raise ConfigError(f"{model}/tokenizer.json: missing (needed to turn text into tokens)")
    if not getattr(AutoTokenizer.from_pretrained(model), "chat_template", None):
        raise ConfigError(f"--chat: the tokenizer in {model} has no chat template; run without --chat")


def start_or_connect(args: argparse.Namespace, command: str) -> tuple[Any, Any]:
    """Connect to the stages ``--connect`` names, or start three local ones; returns (client, LocalPipeline or None).

    Shared by ``blazil generate`` and ``blazil llm serve``: the checkpoint (config, shards, split) and the
    device are checked before anything starts or is announced.
    """
    from blazil_ai.errors import ConfigError
    from blazil_ai.pipeline.client import PipelineClient
    from blazil_ai.pipeline.devices import check_device
    from blazil_ai.pipeline.launcher import LocalPipeline, resolve_transport
    from blazil_ai.pipeline.protocol import own_ipc_stream
    from blazil_ai.pipeline.weights import parse_split

    pipe = None
    if not args.connect:
        for name in ("connect_streams", "listen_stream"):
            if getattr(args, name) is not None:
                raise ConfigError(f"--{name.replace('_', '-')} {getattr(args, name)}: only with --connect")
    if args.connect:
        streams = args.connect_streams or [1] * len(args.connect)
        listen_stream = args.listen_stream if args.listen_stream is not None else (
            own_ipc_stream() if args.listen.startswith("aeron:ipc") else 1)
        client = PipelineClient(list(zip(args.connect, streams)), args.model, (args.listen, listen_stream),
                                timeout=args.timeout, reply_to=args.reply_to)
        try:
            client.connect(args.timeout)
        except BaseException:
            client.close()
            raise
    else:
        check_device(args.device)
        args.transport, why = resolve_transport(args.transport)
        pipe = LocalPipeline(args.model, transport=args.transport, split=parse_split(args.split), dtype=args.dtype,
                             device=args.device, threads=args.threads, timeout=args.timeout,
                             decode_graphs=args.decode_graphs, progress=True)
        print(f"{command}: starting 3 stages ({args.transport}: {why}; {args.device}) for {args.model} ...",
              file=sys.stderr, flush=True)
        client = pipe.start()
    print(f"{command}: stages " + ", ".join(f"{s['stage']}={s['start']}:{s['stop']}" for s in client.stages_info)
          + " ready", file=sys.stderr)
    return client, pipe


def cmd_generate(args: argparse.Namespace) -> int:
    """Handler of ``blazil generate``."""
    from blazil_ai.errors import ConfigError
    from blazil_ai.pipeline.weights import check_context

    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    if not prompt:
        raise ConfigError("no prompt: give PROMPT or pipe text on standard input")
    params = _params(args)
    if args.chat:
        _check_chat_template(args.model)  # before any stage starts
    client, pipe = start_or_connect(args, "blazil generate")
    try:
        ids = client.encode(prompt, chat=args.chat, system=args.system)
        check_context(args.model, len(ids), params.max_new_tokens)
        streamer = None if args.json else _Streamer(client)
        result = client.generate(ids, params, on_token=streamer, on_busy=streamer.busy if streamer else None)
        # How each stage computed, read after the request: a graph capture can fail on first use.
        speed = [s or {} for s in client.ping(min(args.timeout, 5.0))] if args.json else []
    finally:
        if pipe is not None:
            pipe.stop()
        else:
            client.close()
    if args.json:
        out = result.to_dict()
        out.update({"transport": args.transport, "stages": client.stages_info, "sampling": params.to_dict(),
                    "decode_graphs": [bool(s.get("decode_graphs")) for s in speed],
                    "packed_linears": [s.get("packed_linears") for s in speed]})
        failures = {str(i + 1): s["decode_graphs_failure"] for i, s in enumerate(speed)
                    if s.get("decode_graphs_failure")}
        if failures:
            out["decode_graphs_failure"] = failures
        print(json.dumps(out))
    else:
        sys.stdout.write("\n")
        print(f"[{len(result.token_ids)} tokens, finish={result.finish}, prefill {result.prefill_s:.3f}s, "
              f"{result.decode_tokens_per_s:.1f} tokens/s]", file=sys.stderr)
    return 0
