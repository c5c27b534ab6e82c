"""Checkpoints that describe themselves, written so that no user file is ever at risk.

    save_model_folder / check_output_folder   build beside -o, swap in; replace only a folder the same stage wrote
    write_safetensors / read_checkpoint_meta  byte-reproducible headers with cotprune metadata; tensor_index
    weights_fingerprint / folder_fingerprint  a model's identity from the tensors pruning never touches
    lineage                                   (base model, base id) carried along a chain of stages
    masked_matrices                           which matrices carry a pruning mask, from the folder's own record
"""
import json
import os
import re
import shutil
import struct

from common.cli import CotpruneError, one_line
from common.files import atomic_open, check_parent_writable, read_json, write_json


FORMAT_VERSION = "1"  # bump when the checkpoint metadata or a JSONL contract changes incompatibly


def _header_blob(header):
    """A safetensors header as bytes, metadata keys sorted (the library writes them in hash order, so the same
    tensors and metadata gave different bytes from run to run), padded to 8 bytes as the format asks."""
    if "__metadata__" in header:
        header = {**header, "__metadata__": dict(sorted(header["__metadata__"].items()))}
    blob = json.dumps(header, separators=(",", ":")).encode()
    return struct.pack("<Q", len(blob) + (-len(blob) % 8)) + blob + b" " * (-len(blob) % 8)


def write_safetensors(path, tensors, meta=None):
    """Write {name: tensor} as one safetensors file, atomically and byte-reproducibly, with string metadata."""
    from safetensors.torch import save
    data = save({k: v.contiguous() for k, v in tensors.items()}, metadata=meta)
    (n,) = struct.unpack("<Q", data[:8])
    with atomic_open(path, "wb") as f:
        f.write(_header_blob(json.loads(data[8: 8 + n])) + data[8 + n:])


def _stamp_safetensors(path, meta):
    """Add string metadata to a .safetensors header; the tensor bytes are copied unchanged."""
    with open(path, "rb") as src:
        (n,) = struct.unpack("<Q", src.read(8))
        header = json.loads(src.read(n))
        header["__metadata__"] = {**header.get("__metadata__", {}), **meta}
        with atomic_open(path, "wb") as dst:
            dst.write(_header_blob(header))
            shutil.copyfileobj(src, dst, 16 * 2**20)


def safetensors_files(folder):
    """The model's weight files (model.safetensors or its shards), not other tensors kept beside them."""
    files = sorted(os.path.join(folder, f) for f in os.listdir(folder)
                   if re.fullmatch(r"model(-\d+-of-\d+)?\.safetensors", f))
    if not files:
        raise CotpruneError(f"{folder} holds no .safetensors weights")
    return files


def read_checkpoint_meta(folder):
    """The cotprune metadata of a model folder ({} for a folder cotprune did not write); args decoded."""
    from safetensors import safe_open
    path = safetensors_files(folder)[0]
    try:
        with safe_open(path, framework="pt") as f:
            meta = dict(f.metadata() or {})
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error type for a damaged header
        raise CotpruneError(f"{path} is not a readable safetensors file ({one_line(e)})") from None
    if "cotprune_args" in meta:
        meta["cotprune_args"] = json.loads(meta["cotprune_args"])
    return meta


def tensor_index(folder):
    """{tensor name: safetensors file} over every shard of a model folder."""
    from safetensors import safe_open
    index = {}
    for path in safetensors_files(folder):
        with safe_open(path, framework="pt") as f:
            index.update({k: path for k in f.keys()})
    return index


EMBEDDINGS = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight")


def is_identity_tensor(name, shape):
    """Tensors that say which model a checkpoint comes from: the 1-D normalisation weights and the input embeddings.
    No stage changes the norms; only prune.py --prune-embeddings changes the embeddings, and a chain records its
    root's fingerprint before any pruning, so the recorded id survives it. (The norms alone would not do: a freshly
    initialised model's norms are all ones.)"""
    return (len(shape) == 1 and "norm" in name.rsplit(".", 1)[0].rsplit(".", 1)[-1]) or name.endswith(EMBEDDINGS)


def weights_fingerprint(named_tensors):
    """A hash of the identity tensors (is_identity_tensor): two checkpoints of one model agree, two models do not.

    named_tensors: iterable of (name, tensor). Values are rounded to bfloat16 first, so a float32 and a bfloat16
    copy of one model agree. Returns 'sha256:<16 hex>', or None if there is no such tensor.
    """
    import hashlib
    import torch
    h, n = hashlib.sha256(), 0
    for name, t in sorted((k, v) for k, v in named_tensors if is_identity_tensor(k, tuple(v.shape))):
        h.update(f"{name}:{tuple(t.shape)};".encode())
        h.update(t.detach().to("cpu", torch.bfloat16).view(torch.int16).numpy().tobytes())
        n += 1
    return f"sha256:{h.hexdigest()[:16]}" if n else None


def folder_fingerprint(folder):
    """weights_fingerprint of a model folder's files, read tensor by tensor (the recorded one if cotprune wrote it)."""
    from safetensors import safe_open
    meta = read_checkpoint_meta(folder)
    if meta.get("cotprune_base_id"):
        return meta["cotprune_base_id"]

    def tensors():
        for path in safetensors_files(folder):
            with safe_open(path, framework="pt") as f:
                for k in f.keys():
                    if is_identity_tensor(k, tuple(f.get_slice(k).get_shape())):
                        yield k, f.get_tensor(k)
    return weights_fingerprint(tensors())


def lineage(model_spec, model):
    """(base model, base id) for a stage's output: inherited from a cotprune folder, else this model is the root."""
    meta = read_checkpoint_meta(model_spec) if os.path.isdir(model_spec) else {}
    base = meta.get("cotprune_args", {}).get("base_model") or (
        os.path.abspath(model_spec) if os.path.isdir(model_spec) else model_spec)
    return base, meta.get("cotprune_base_id") or weights_fingerprint(model.state_dict().items())


def masked_matrices(folder):
    """Names (without '.weight') of the matrices whose zeros are a pruning mask, from the folder's own record:
    `masked_matrices` in prune_report.json or recover_report.json, which each stage carries along the chain (a
    --sparsity 0 copy or a neuron-sliced copy of a pruned model keeps its source's masks). None when cotprune did
    not write the folder: only then may a caller fall back to counting zeros."""
    for name in ("prune_report.json", "recover_report.json"):
        path = os.path.join(folder, name) if os.path.isdir(folder) else ""
        if os.path.isfile(path):
            report = read_json(path, name)
            if not isinstance(report.get("masked_matrices", []), list):
                raise CotpruneError(f"{path}: masked_matrices is not a list")
            if "masked_matrices" in report:
                return set(report["masked_matrices"])
            if name == "recover_report.json" or str(report.get("method", "")).startswith("neuron") \
                    or not report.get("sparsity"):
                return set()  # reports from before masks were carried along: these made none
            return {r["name"].removesuffix(".weight") for r in report.get("matrices", [])}
    return None


def _is_stage_folder(path, stage):
    """Did cotprune's `stage` write this folder? (its weights carry that stage's metadata stamp)"""
    try:
        return read_checkpoint_meta(path).get("cotprune_stage") == stage
    except (CotpruneError, OSError, ValueError):
        return False


def check_output_folder(out_dir, stage, inputs=()):
    """Refuse, before any work, an -o that the stage may not replace: only a folder the same stage wrote (or a new
    path) can be; never '/', the home or working directory, an input or a folder holding one, nor a file."""
    out = os.path.realpath(out_dir)
    forbidden = {os.path.realpath(p) for p in ("/", os.path.expanduser("~"), os.getcwd())}
    if out in forbidden:
        raise CotpruneError(f"-o {out_dir} is {'/' if out == '/' else 'the home or working directory'}: "
                            f"name a new folder")
    for src in inputs:
        if src and os.path.exists(src):
            real = os.path.realpath(src)
            if real == out or real.startswith(out.rstrip("/") + "/"):
                raise CotpruneError(f"-o {out_dir} holds the input {src}: it would be destroyed; name a new folder")
    if os.path.lexists(out_dir):
        if os.path.islink(out_dir):
            raise CotpruneError(f"-o {out_dir} is a symbolic link: name a real folder")
        if not os.path.isdir(out_dir):
            raise CotpruneError(f"-o {out_dir} exists and is not a folder: name a new folder")
        if os.listdir(out_dir) and not _is_stage_folder(out_dir, stage):
            raise CotpruneError(f"-o {out_dir} is a folder that {stage} did not write: it is left alone; name a new "
                                f"folder or remove it yourself")
    check_parent_writable(out_dir)


def save_model_folder(model, tokenizer, out_dir, stage, source_model, args, extra_json=None, extra_files=None,
                      base_id=None):
    """Write an ordinary Hugging Face model folder, all at once: build it in a new hidden folder beside `out_dir`,
    then swap it in. An existing `out_dir` is replaced only if check_output_folder allows it (the same stage wrote it).

    Every .safetensors file carries the cotprune metadata (format version, stage, source model, arguments, the base
    model's weight fingerprint), and `extra_json` files ({name: object}) land beside it, as do `extra_files`
    ({name: writer(path)}).
    """
    import tempfile
    check_output_folder(out_dir, stage, [source_model])
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir.rstrip('/'))}.", suffix=".tmp", dir=parent)
    try:
        try:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
        except Exception as e:  # noqa: BLE001 - a full disk comes as OSError or as safetensors' own error type
            raise CotpruneError(f"cannot write {out_dir}: {one_line(e)}") from None
        meta = {"format": "pt", "cotprune_format": FORMAT_VERSION, "cotprune_stage": stage,
                "cotprune_source_model": source_model, "cotprune_args": json.dumps(args, sort_keys=True)}
        if base_id:
            meta["cotprune_base_id"] = base_id
        for name in sorted(os.listdir(tmp)):
            if name.endswith(".safetensors"):
                _stamp_safetensors(os.path.join(tmp, name), meta)
        for name, obj in (extra_json or {}).items():
            write_json(os.path.join(tmp, name), obj)
        for name, writer in (extra_files or {}).items():
            writer(os.path.join(tmp, name))
        check_output_folder(out_dir, stage, [source_model])  # again: another run may have written it meanwhile
        old = None
        if os.path.isdir(out_dir):  # ours (checked): move it aside, swap the new one in, then drop the old one
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir.rstrip('/'))}.", suffix=".old", dir=parent)
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old:
        shutil.rmtree(old, ignore_errors=True)
