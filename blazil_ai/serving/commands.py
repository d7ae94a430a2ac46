"""``blazil llm serve``: the OpenAI-compatible HTTP server over a three-stage pipeline."""

from __future__ import annotations

import argparse
import socket

from blazil_ai.pipeline.commands import pipeline_arguments

SERVE_EPILOG = """\
examples:
  blazil models random-qwen ./tiny-qwen        # a small random checkpoint to try it with
  blazil llm serve --model ./tiny-qwen --port 8000
  curl -s http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
       -d '{"model": "tiny-qwen", "prompt": "Hello", "max_tokens": 8, "temperature": 0}'
  blazil llm serve --model ./Qwen2.5-7B-Instruct --device cuda --served-model-name qwen2.5-7b
  blazil llm serve --model ./qwen --connect tcp://host-a:7001,tcp://host-b:7002,tcp://host-c:7003 \\
       --listen tcp://0.0.0.0:7000 --reply-to tcp://this-host:7000

Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (the model's chat
template; "stream": true for server-sent events), GET /health (200 only when every stage answers),
GET /metrics (Prometheus, blazil_llm_*). Extra request fields: top_k, repetition_penalty,
ignore_eos, return_token_ids. Settings a request leaves out come from the checkpoint's
generation_config.json (greedy when it has none). Requests in flight share each decode step;
beyond --max-running they wait, beyond --max-queue waiting ones the server answers 503 with
Retry-After. A stage that dies fails the requests of the moment with 503 naming it; local stages
are restarted, remote ones are waited for.
"""


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``llm serve`` to the ``blazil`` command."""
    llm = sub.add_parser("llm", help="serve a Qwen2 pipeline over HTTP (OpenAI-compatible API)",
                         description="Long-running text generation services over the three-stage pipeline.")
    lsub = llm.add_subparsers(dest="llm_command", metavar="SUBCOMMAND")
    s = lsub.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching",
                        description="Start the three stages of a Qwen2 checkpoint once (or connect to running "
                                    "ones) and serve the OpenAI API over HTTP until stopped (Ctrl-C, SIGTERM).",
                        epilog=SERVE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("--model", required=True, help="Hugging Face Qwen2 checkpoint directory (its tokenizer too)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    s.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000; 0 picks a free one)")
    s.add_argument("--served-model-name", default=None,
                   help="the name clients give as \"model\" (default: the model directory's name)")
    s.add_argument("--max-running", type=int, default=32,
                   help="most requests decoding together in the stages' batch (default 32)")
    s.add_argument("--max-queue", type=int, default=64,
                   help="most requests waiting for a place; beyond, 503 with Retry-After (default 64)")
    s.add_argument("--batch-wait-ms", type=float, default=0.0,
                   help="when the stages are idle, requests start together once the server has read every "
                        "request that reached it and none has come for this long (at once when --max-running "
                        "have come, at most max(20 times this, 20 ms) in all), so a burst shares one first "
                        "forward; raise it for clients whose requests of one burst come milliseconds apart "
                        "(default 0)")
    s.add_argument("--access-log", action="store_true", help="log every HTTP request")
    pipeline_arguments(s, "the server")
    s.set_defaults(func=cmd_serve)
    llm.set_defaults(func=lambda args: (llm.print_help(), 2)[1])


def cmd_serve(args: argparse.Namespace) -> int:
    """Handler of ``blazil llm serve``."""
    from blazil_ai.errors import ConfigError

    for name in ("max_running", "max_queue"):
        if getattr(args, name) < (1 if name == "max_running" else 0):
            raise ConfigError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be >= "
                              f"{1 if name == 'max_running' else 0}")
    if not 0 <= args.batch_wait_ms <= 1000:
        raise ConfigError(f"--batch-wait-ms {args.batch_wait_ms}: must be 0..1000")
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port {args.port}: must be 0..65535")
    if not args.timeout > 0:
        raise ConfigError(f"--timeout {args.timeout}: must be > 0")
    sock = bind(args.host, args.port)  # before anything heavy is imported or started: a taken port fails at once
    try:
        from blazil_ai.serving.server import serve
        return serve(args, sock)
    finally:
        sock.close()


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port``."""
    from blazil_ai.errors import ConfigError

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ConfigError(f"--host {host}: {e.strerror}") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise ConfigError(f"--port {port}: cannot listen on {host}:{port}: {e.strerror}") from None
    sock.listen(1024)
    return sock
