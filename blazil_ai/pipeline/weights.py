"""Reading a Hugging Face Qwen2 checkpoint directory: the config, and only the tensors one stage needs.

A checkpoint is ``config.json`` plus either ``model.safetensors`` or ``model.safetensors.index.json``
with its shards. A stage asks for the tensors of its layers (and the embeddings, final norm, LM head
where it holds them); each is read from the one shard the index's weight map names, so a stage never
maps the rest of the model. Any missing or inconsistent file is reported by name.

On the CPU the layers and the LM head, which every token reads whole, are read (``preadv``) into the
stage's own memory, so a stage that says it is loaded holds them and the first request does not wait
for the disk. The embedding table stays mapped from the file: a lookup reads one row per token, so
only the rows of tokens actually seen are ever paged in (as in Hugging Face's own loading).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from blazil_ai.errors import ConfigError, DataError
from blazil_ai.files import read_json_object

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


@dataclass(slots=True)
class StageSpec:
    """Which part of the model one stage holds: layers ``[start, stop)``, and the ends where it is first/last."""

    stage: int
    start: int
    stop: int
    num_layers: int

    @property
    def is_first(self) -> bool:
        """Whether this stage holds the token embeddings."""
        return self.start == 0

    @property
    def is_last(self) -> bool:
        """Whether this stage holds the final norm and the LM head (and samples)."""
        return self.stop == self.num_layers


def load_config(model_dir: str | os.PathLike[str]) -> Any:
    """Read ``config.json`` of a Qwen2 checkpoint directory as a ``Qwen2Config``."""
    from transformers import Qwen2Config

    path = Path(model_dir) / "config.json"
    if not Path(model_dir).is_dir():
        raise ConfigError(f"model directory {model_dir} does not exist")
    if not path.is_file():
        raise ConfigError(f"{path}: missing (a Hugging Face checkpoint directory has config.json)")
    raw = read_json_object(path)
    if raw.get("model_type") != "qwen2":
        raise DataError(f"model_type is {raw.get('model_type')!r}, this pipeline runs 'qwen2'", path=str(path),
                        field="model_type")
    try:
        return Qwen2Config.from_dict(raw)
    except Exception as e:  # transformers and huggingface_hub check each field's type and the fields' agreement
        raise DataError(f"not a valid Qwen2 config: {' '.join(str(e).split())}", path=str(path)) from None


def context_length(model_dir: str | os.PathLike[str]) -> int:
    """The most positions (prompt plus generated tokens) the model takes: ``max_position_embeddings``."""
    return int(load_config(model_dir).max_position_embeddings)


def check_context(model_dir: str | os.PathLike[str], prompt_tokens: int, max_new_tokens: int,
                  context: int | None = None) -> None:
    """Raise :class:`ConfigError` when the prompt plus the tokens asked for exceed the model's context."""
    ctx = context_length(model_dir) if context is None else context
    if prompt_tokens + max_new_tokens > ctx:
        room = f"at most {ctx - max_new_tokens} prompt tokens fit" if max_new_tokens < ctx else \
            f"ask for fewer than {ctx} new tokens"
        raise ConfigError(f"the prompt is {prompt_tokens} tokens and {max_new_tokens} new tokens are asked for, "
                          f"but the model's context is {ctx} tokens (max_position_embeddings in "
                          f"{Path(model_dir) / 'config.json'}); {room}")


def model_fingerprint(model_dir: str | os.PathLike[str]) -> str:
    """A short hash of ``config.json`` (and the index), which every stage of one pipeline must share."""
    h = hashlib.sha256()
    for name in ("config.json", INDEX_NAME):
        p = Path(model_dir) / name
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()[:16]


def split_layers(num_layers: int, split: tuple[int, ...] | None = None, stages: int = 3) -> list[tuple[int, int]]:
    """Layer ranges of each stage; ``split`` holds the first layer of stages 2.. (28 layers: 10,20)."""
    if split is None:
        base = round(num_layers / stages + 0.25)
        split = tuple(min(num_layers - (stages - i), base * i) for i in range(1, stages))
    bounds = [0, *split, num_layers]
    if len(bounds) != stages + 1 or any(b <= a for a, b in zip(bounds, bounds[1:])):
        raise ConfigError(f"split {','.join(map(str, split))} does not cut {num_layers} layers into {stages} "
                          "non-empty stages (give the first layer of stages 2 and 3, e.g. 10,20)")
    return list(zip(bounds, bounds[1:]))


def parse_split(text: str | None) -> tuple[int, ...] | None:
    """Parse ``--split A,B`` into a tuple of ints (None when not given)."""
    if not text:
        return None
    try:
        return tuple(int(p) for p in text.split(","))
    except ValueError as e:
        raise ConfigError(f"--split {text!r}: expected comma-separated layer numbers such as 10,20") from e


def parse_layers(text: str) -> tuple[int, int]:
    """Parse ``--layers A:B`` (layers A..B-1)."""
    try:
        a, b = (int(p) for p in text.split(":"))
    except ValueError as e:
        raise ConfigError(f"--layers {text!r}: expected START:STOP such as 0:10") from e
    if not 0 <= a < b:
        raise ConfigError(f"--layers {text!r}: need 0 <= START < STOP")
    return a, b


def stage_tensor_names(spec: StageSpec, config: Any, available: set[str]) -> list[tuple[str, str]]:
    """Pairs (checkpoint tensor name, name inside the stage) this stage needs; layers are renumbered from 0."""
    want: list[tuple[str, str]] = []
    for i in range(spec.start, spec.stop):
        prefix = f"model.layers.{i}."
        found = sorted(n for n in available if n.startswith(prefix))
        if not found:
            raise DataError(f"checkpoint has no tensors for layer {i}", field=prefix + "*")
        want.extend((n, f"layers.{i - spec.start}." + n[len(prefix):]) for n in found)
    if spec.is_first:
        want.append(("model.embed_tokens.weight", "embed_tokens.weight"))
    if spec.is_last:
        want.append(("model.norm.weight", "norm.weight"))
        if "lm_head.weight" in available:
            want.append(("lm_head.weight", "lm_head.weight"))
        elif getattr(config, "tie_word_embeddings", False):
            # Tied embeddings: the LM head is the embedding matrix, stored once under the embedding name.
            want.append(("model.embed_tokens.weight", "lm_head.weight"))
        else:
            raise DataError("checkpoint has no lm_head.weight and tie_word_embeddings is false", field="lm_head.weight")
    for name, _ in want:
        if name not in available:
            raise DataError(f"checkpoint has no tensor {name}", field=name)
    return want


def weight_map(model_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """Tensor name -> shard file, from the index (or the single ``model.safetensors``); checks the files exist."""
    from safetensors import safe_open

    root = Path(model_dir)
    index = root / INDEX_NAME
    if index.is_file():
        try:
            raw = json.loads(index.read_text())
        except json.JSONDecodeError as e:
            raise DataError(f"not valid JSON: {e.msg}", path=str(index), line=e.lineno) from e
        wm = raw.get("weight_map")
        if not isinstance(wm, dict) or not wm:
            raise DataError("no weight_map", path=str(index), field="weight_map")
        out = {name: root / fname for name, fname in wm.items()}
        for f in sorted(set(out.values())):
            if not f.is_file():
                raise ConfigError(f"{f}: checkpoint shard named by {index.name} is missing")
        return out
    single = root / SINGLE_NAME
    if not single.is_file():
        raise ConfigError(f"{root}: no {SINGLE_NAME} and no {INDEX_NAME} (a safetensors checkpoint is needed)")
    try:
        with safe_open(str(single), framework="pt") as f:
            names = list(f.keys())
    except Exception as e:  # safetensors raises its own error types for a bad header
        raise DataError(f"not a readable safetensors file: {e}", path=str(single)) from e
    return {n: single for n in names}


def load_stage_tensors(model_dir: str | os.PathLike[str], spec: StageSpec, config: Any,
                       dtype: Any = None, device: str = "cpu") -> dict[str, Any]:
    """Read only this stage's tensors (renamed for the stage) from the checkpoint, checking their shapes."""
    from safetensors import safe_open

    wmap = weight_map(model_dir)
    wanted = stage_tensor_names(spec, config, set(wmap))
    by_file: dict[Path, list[tuple[str, str]]] = {}
    for name, local in wanted:
        by_file.setdefault(wmap[name], []).append((name, local))
    expected = _expected_shapes(config)
    out: dict[str, Any] = {}

    def keep(path: Path, name: str, local: str, t: Any) -> None:
        shape_key = _shape_key(name)
        if shape_key in expected and tuple(t.shape) != expected[shape_key]:
            raise DataError(f"tensor {name} has shape {tuple(t.shape)}, config.json implies {expected[shape_key]}",
                            path=str(path), field=name)
        out[local] = t.to(dtype) if dtype is not None else t

    for path, names in sorted(by_file.items()):
        read = [(n, local) for n, local in names if device == "cpu" and local != "embed_tokens.weight"]
        if read:
            for (name, local), t in zip(read, read_safetensors(path, [n for n, _ in read])):
                keep(path, name, local, t)
        mapped = [pair for pair in names if pair not in read]
        if not mapped:
            continue
        try:
            with safe_open(str(path), framework="pt", device=device) as f:
                present = set(f.keys())
                for name, local in mapped:
                    if name not in present:
                        raise DataError(f"tensor {name} is not in this file although the index names it",
                                        path=str(path), field=name)
                    keep(path, name, local, f.get_tensor(name))
        except DataError:
            raise
        except Exception as e:
            raise DataError(f"cannot read checkpoint file: {e}", path=str(path)) from e
    return out


_ST_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64", "I64": "int64",
              "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def read_safetensors(path: str | os.PathLike[str], names: list[str]) -> list[Any]:
    """Read tensors ``names`` of one ``.safetensors`` file into fresh CPU tensors, in that order.

    The format is an 8-byte little-endian header length, a JSON header giving each tensor's dtype,
    shape and byte range after the header, then the data. Each tensor is read straight into its
    own memory; a short file, a range that disagrees with dtype x shape, or an unknown dtype is a
    :class:`DataError` naming the file and the tensor.
    """
    import torch

    path = Path(path)
    out = []
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        raise DataError(f"cannot open checkpoint file: {e.strerror}", path=str(path)) from e
    try:
        size = os.fstat(fd).st_size
        head = os.pread(fd, 8, 0)
        if len(head) < 8:
            raise DataError(f"file of {size} bytes is too short for a safetensors header", path=str(path))
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, 100 << 20):
            raise DataError(f"header length {n} does not fit the file's {size} bytes (truncated or not "
                            "safetensors)", path=str(path))
        try:
            header = json.loads(os.pread(fd, n, 8))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DataError(f"safetensors header is not valid JSON: {e}", path=str(path)) from e
        base = 8 + n
        for name in names:
            info = header.get(name)
            if not isinstance(info, dict):
                raise DataError(f"tensor {name} is not in this file although the index names it",
                                path=str(path), field=name)
            if info.get("dtype") not in _ST_DTYPES:
                raise DataError(f"tensor {name} has dtype {info.get('dtype')!r}, not one of "
                                f"{', '.join(_ST_DTYPES)}", path=str(path), field=name)
            start, end = (int(x) for x in info["data_offsets"])
            t = _empty_aligned_as_mapped([int(d) for d in info["shape"]], getattr(torch, _ST_DTYPES[info["dtype"]]),
                                         base + start)
            nbytes = t.numel() * t.element_size()
            if end - start != nbytes:
                raise DataError(f"tensor {name}: byte range {start}..{end} does not hold {info['dtype']} "
                                f"{tuple(t.shape)} ({nbytes} bytes)", path=str(path), field=name)
            if base + end > size:
                raise DataError(f"tensor {name} ends at byte {base + end} but the file has {size} bytes "
                                "(truncated?)", path=str(path), field=name)
            raw: Any = t.reshape(-1).view(torch.uint8).numpy()  # the tensor's own memory, as bytes
            done = 0
            while done < nbytes:  # preadv may return less than asked (large reads, signals)
                got = os.preadv(fd, [raw[done:]], base + start + done)
                if got <= 0:
                    raise DataError(f"tensor {name}: the file ended while reading it", path=str(path), field=name)
                done += got
            out.append(t)
    finally:
        os.close(fd)
    return out


def _empty_aligned_as_mapped(shape: list[int], dtype: Any, file_offset: int) -> Any:
    """A fresh tensor whose address has the alignment (mod 64 bytes) its bytes have in the file.

    Hugging Face maps a checkpoint and, where no dtype conversion is asked for, computes with the
    mapped tensors, whose addresses are page + file offset. MKL's float32 kernels sum in an order
    that depends on the weight's alignment (a 16-byte boundary changes the last bits of a one-row
    product), so to give the same bits a tensor read into our own memory sits at the same
    alignment as the mapped one. A conversion (``.to(dtype)``) makes a fresh, 64-byte aligned tensor
    on both sides.
    """
    import torch

    size = torch.Size(shape).numel() * dtype.itemsize
    buf = torch.empty(size + 64, dtype=torch.uint8)
    shift = (file_offset - buf.data_ptr()) % 64
    if shift % dtype.itemsize:  # an offset no view of this dtype can have: alignment is then moot
        shift = 0
    return buf[shift:shift + size].view(dtype).view(shape)


def _shape_key(name: str) -> str:
    parts = name.split(".")
    if name.startswith("model.layers."):
        return ".".join(parts[3:])
    return name


def _expected_shapes(config: Any) -> dict[str, tuple[int, ...]]:
    h, inter, v = config.hidden_size, config.intermediate_size, config.vocab_size
    hd = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q, kv = config.num_attention_heads * hd, config.num_key_value_heads * hd
    return {
        "model.embed_tokens.weight": (v, h), "lm_head.weight": (v, h), "model.norm.weight": (h,),
        "self_attn.q_proj.weight": (q, h), "self_attn.q_proj.bias": (q,),
        "self_attn.k_proj.weight": (kv, h), "self_attn.k_proj.bias": (kv,),
        "self_attn.v_proj.weight": (kv, h), "self_attn.v_proj.bias": (kv,),
        "self_attn.o_proj.weight": (h, q),
        "mlp.gate_proj.weight": (inter, h), "mlp.up_proj.weight": (inter, h), "mlp.down_proj.weight": (h, inter),
        "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
    }
