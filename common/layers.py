"""The decoder blocks of a model, and running them one at a time: the layer-capture idiom, written once.

    decoder_layers / block_linears / gated_mlps   the blocks, their Linears, their SwiGLU MLPs
    capture_block_inputs                          hidden states entering block 0 (and the kwargs blocks get)
    run_block / input_groups / gram_matrices      one block's outputs, which Linears share an input, G = sum x x^T
"""
import torch

from common.cli import CotpruneError


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


def run_block(layer, inputs, kwargs, device, batch):
    """The block's outputs [n, T, d] for inputs [n, T, d] (kept on the CPU), `batch` windows at a time."""
    outs = []
    with torch.inference_mode():
        for i in range(0, len(inputs), batch):
            out = layer(inputs[i: i + batch].to(device), **kwargs)
            outs.append((out[0] if isinstance(out, tuple) else out).cpu())
    return torch.cat(outs)


def input_groups(layer, sample, kwargs, device):
    """Names of the block's Linears grouped by the tensor they read (q/k/v share one, gate/up another)."""
    groups, held, hooks = {}, [], []

    def note(name, x):
        # Keyed by the tensor object, which `held` keeps alive: a freed input's address can be reused by the next
        # (e.g. o_proj's input landing where the attention norm's output was), so data_ptr() alone merged groups.
        if not any(x is h for h in held):
            held.append(x)
        groups.setdefault(next(k for k, h in enumerate(held) if x is h), []).append(name)

    for name, mod in layer.named_modules():
        if isinstance(mod, torch.nn.Linear):
            hooks.append(mod.register_forward_hook(lambda m, args, out, name=name: note(name, args[0])))
    try:
        run_block(layer, sample, kwargs, device, 1)
    finally:
        for h in hooks:
            h.remove()
    return list(groups.values())


def gram_matrices(layer, groups, inputs, kwargs, device, batch):
    """{group leader: (G = sum x x^T in float32 [in, in], token count)} over all windows."""
    stats, hooks, modules = {}, [], dict(layer.named_modules())

    def accumulate(mod, args, out, key):
        x = args[0].reshape(-1, args[0].shape[-1]).float()  # [tokens, in]
        if key not in stats:
            stats[key] = [torch.zeros(x.shape[1], x.shape[1], device=x.device), 0]
        stats[key][0].addmm_(x.T, x)  # in place: G is up to in^2 floats (95 MB for a 4864-wide input)
        stats[key][1] += x.shape[0]

    for group in groups:
        hooks.append(modules[group[0]].register_forward_hook(lambda m, a, o, key=group[0]: accumulate(m, a, o, key)))
    try:
        run_block(layer, inputs, kwargs, device, batch)
    finally:
        for h in hooks:
            h.remove()
    return stats
