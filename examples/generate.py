"""Text generation over three stage processes, from Python.

Run: python examples/generate.py [MODEL_DIR] [--transport tcp|aeron]

Without MODEL_DIR a tiny random Qwen2 checkpoint (Qwen2.5's real tokenizer, random weights, so the
text is gibberish) is written to a temporary directory; give a real Qwen2 checkpoint directory
(e.g. Qwen2.5-0.5B-Instruct or Qwen2.5-7B-Instruct in Hugging Face layout) for real text.
"""

from __future__ import annotations

import argparse
import sys
import tempfile

from blazil_ai.pipeline.launcher import LocalPipeline
from blazil_ai.pipeline.random_model import save_tiny_checkpoint
from blazil_ai.pipeline.sampling import SamplingParams


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", help="Qwen2 checkpoint directory (default: a tiny random one)")
    p.add_argument("--transport", choices=("tcp", "aeron"), default="tcp")
    args = p.parse_args()
    tmp = None
    if args.model is None:
        tmp = tempfile.TemporaryDirectory(prefix="tiny-qwen2-")
        args.model = str(save_tiny_checkpoint(tmp.name, seed=0))
        print(f"wrote a tiny random Qwen2 to {args.model}", file=sys.stderr)

    with LocalPipeline(args.model, transport=args.transport, threads=1) as pipe:
        client = pipe.client
        assert client is not None
        print("stages:", [(s["stage"], f"{s['start']}:{s['stop']}") for s in client.stages_info])

        # Greedy: the same ids Hugging Face generate(do_sample=False) gives.
        ids = client.encode("What does a ledger record?", chat=True)
        result = client.generate(ids, SamplingParams(max_new_tokens=24),
                                 on_token=lambda rid, tok: print(client.decode([tok]), end="", flush=True))
        print(f"\n[{len(result.token_ids)} tokens, {result.finish}, prefill {result.prefill_s * 1000:.0f} ms, "
              f"{result.decode_tokens_per_s:.1f} tokens/s]")

        # Sampling with a seed is reproducible; several requests in flight share each stage's forward.
        prompts = [client.encode(t) for t in ("Once upon a time", "The balance is", "Transfer approved:")]
        params = [SamplingParams(max_new_tokens=16, temperature=0.8, top_p=0.9, seed=42 + i) for i in range(3)]
        for r in client.generate_many(prompts, params):
            print(f"{r.finish:>6} {r.token_ids[:8]} ... {r.text!r}")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
