"""The engine's decode step for Llama-family decoder blocks, written out as tensor operations.

transformers' decoder layer makes about fifteen module calls a layer (two norms, seven projections, the attention
and MLP modules, the activation) around a few dozen tensor operations; at one token per slot on the CPU the calls
and the separate projections cost 4-10 % of a decode step for a 135M model (docs/methods.md). Stepper makes the
same tensor operations in the same order as transformers 5's LlamaDecoderLayer, LlamaAttention, LlamaRMSNorm,
LlamaMLP and apply_rotary_pos_emb (Qwen2's and Mistral's are the same code), so a row keeps its bits (tested against
model.generate), with one change that keeps them too: the q, k and v projections run as one matmul on their stacked
weights, and gate and up as another, where a probe shows that each output of the stacked matmul has the bits of its
own (true of oneDNN's packed kernels: an output's sum runs over the input dimension alone). It leans on those
classes' internals, so it takes only the layers it knows (stepper_supported) and the engine keeps the model's own
modules for anything else, and for prefill.

    stepper_supported   (True, '') if Stepper can write out this model's decoder layers, else (False, why)
    Stepper             the decoder blocks on one token per slot: .blocks(h, position_ids, mask, cache, **attention)
"""
import sys

LAYERS = ("LlamaDecoderLayer", "Qwen2DecoderLayer", "MistralDecoderLayer")  # the same forward in transformers 5
LINEAR_ATTR = "cotprune_linear"  # set by fast_linears while it packs: (pack(weight), linear(x, packed weight, bias))


def stepper_supported(model):
    """(True, '') if every decoder layer is one whose forward Stepper writes out, with no hooks to bypass."""
    for layer in model.model.layers:
        name = type(layer).__name__
        if name not in LAYERS:
            return False, f"{name} is not a decoder layer the written-out step knows ({', '.join(LAYERS)})"
        a, f = layer.self_attn, layer.mlp
        if type(f.act_fn).__name__ not in ("SiLUActivation", "SiLU") or hasattr(a, "q_norm"):
            return False, f"{name} with another activation or per-head norms"
        if not all(type(n).__name__.endswith("RMSNorm") and hasattr(n, "variance_epsilon")
                   for n in (layer.input_layernorm, layer.post_attention_layernorm)):
            return False, f"{name} with another norm"
        if any(m._forward_hooks or m._forward_pre_hooks or hasattr(m, "_hf_hook") for m in layer.modules()):
            return False, "the decoder layers carry hooks (offloading, adapters) the written-out step would skip"
        if not hasattr(sys.modules[type(layer).__module__], "eager_attention_forward"):
            return False, f"{name}'s module has no eager_attention_forward (another transformers version?)"
    return True, ""


def _rms_norm(norm, h):
    """LlamaRMSNorm.forward: the mean of squares in float32, the weight applied in the input's dtype."""
    import torch
    x = h.to(torch.float32)
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    return norm.weight * x.to(h.dtype)


def _rotate_half(x):
    import torch
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Stepper:
    """The decoder blocks and the final norm on one token per slot. The stacked q/k/v and gate/up weights are
    copies (packed where the linears are: 70 M parameters for SmolLM2), made at the first step on each kind of
    linears, so the model's weights must not change while a Stepper is in use."""

    def __init__(self, model):
        self.model, self.inner = model, model.model
        self.layers = list(self.inner.layers)
        # Per layer, the projections run together: (stacked bias or None, output sizes, modules), q/k/v then gate/up.
        self.stacks = []
        for layer in self.layers:
            a, f = layer.self_attn, layer.mlp
            self.stacks.append([self._stack((a.q_proj, a.k_proj, a.v_proj)), self._stack((f.gate_proj, f.up_proj))])
        # (the pack function of fast_linears, or None for the default linears; the stacked weights for it)
        self.weights = ("unset", None)
        self.ok = {}  # (packed?, rows) -> whether the stacked matmul gives the separate ones' bits
        self.eager = sys.modules[type(self.layers[0]).__module__].eager_attention_forward

    @staticmethod
    def _stack(mods):
        import torch
        biases = [m.bias for m in mods]
        bias = None if all(b is None for b in biases) else torch.cat(
            [b if b is not None else m.weight.new_zeros(m.out_features) for m, b in zip(mods, biases)])
        return bias, [m.out_features for m in mods], mods

    @staticmethod
    def _stacked_weight(mods, pack):
        """[out_1 + out_2 + ..., in]: the modules' weights stacked, packed by `pack` where given."""
        import torch
        W = torch.cat([m.weight.detach() for m in mods])
        return W if pack is None else pack(W)

    def _project(self, i, which, x):
        """Layer i's q/k/v (which 0) or gate/up (which 1) outputs on x: one stacked matmul, or the modules."""
        import torch
        b, sizes, mods = self.stacks[i][which]
        linear = getattr(self.model, LINEAR_ATTR, None)
        key = (linear is not None, x.shape[0] * x.shape[1])
        if key not in self.ok:
            self.ok[key] = self._stacked_ok(linear, x)
        if not self.ok[key]:
            return [m(x) for m in mods]
        pack = None if linear is None else linear[0]
        if self.weights[0] is not pack:  # once per kind of linears (per fast_linears block)
            self.weights = (None, None)  # the old copy goes before the new one is made: one copy at a time
            self.weights = (pack, [[self._stacked_weight(s[2], pack) for s in pair] for pair in self.stacks])
        W = self.weights[1][i][which]
        return (torch.nn.functional.linear(x, W, b) if linear is None else linear[1](x, W, b)).split(sizes, -1)

    def _stacked_ok(self, linear, x):
        """Whether the stacked matmuls give every output the bits the separate modules give, on random rows of x's
        shape and dtype for the first layer (the kernels are the same for every layer of one shape)."""
        import torch
        g = torch.Generator(device=x.device).manual_seed(0)
        probe = torch.randn(x.shape, generator=g, device=x.device).to(x.dtype)
        for b, sizes, mods in self.stacks[0]:
            W = self._stacked_weight(mods, None if linear is None else linear[0])
            got = torch.nn.functional.linear(probe, W, b) if linear is None else linear[1](probe, W, b)
            if not all(torch.equal(o, m(probe)) for o, m in zip(got.split(sizes, -1), mods)):
                return False
        return True

    def blocks(self, h, position_ids, mask, cache, **attention):
        """Hidden states h [slots, 1, d] -> the final norm's output [slots, 1, d], keys written into `cache`;
        `attention` goes to the attention function as a decoder layer's kwargs do."""
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
        B, T = h.shape[:2]
        attend = ALL_ATTENTION_FUNCTIONS.get_interface(self.model.config._attn_implementation, self.eager)
        cos, sin = self.inner.rotary_emb(h, position_ids=position_ids)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [B, 1, T, head_dim] against [B, heads, T, head_dim]
        for i, layer in enumerate(self.layers):
            a, f = layer.self_attn, layer.mlp
            residual = h
            q, k, v = (t.view(B, T, -1, a.head_dim).transpose(1, 2)
                       for t in self._project(i, 0, _rms_norm(layer.input_layernorm, h)))
            q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
            k, v = cache.update(k, v, i)
            out, _ = attend(a, q, k, v, mask, dropout=0.0, scaling=a.scaling, **attention)
            h = residual + a.o_proj(out.reshape(B, T, -1).contiguous())
            residual = h
            gate, up = self._project(i, 1, _rms_norm(layer.post_attention_layernorm, h))
            h = residual + f.down_proj(f.act_fn(gate) * up)
        return self.inner.norm(h)
