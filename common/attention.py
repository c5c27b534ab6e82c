"""The attention functions the engine registers with transformers' AttentionInterface, and when it uses which.

They lean on transformers' sdpa attention (_exact_decode makes the very call its wrapper makes for a prompt alone,
so that float32 rows keep model.generate's bits); kept in one room so that an upgrade breaks one file.

    exact_attention     whether decode attention runs slot by slot (float32, or COTPRUNE_EXACT_ATTENTION)
    batched_attention   otherwise: two batched matmuls (CPU bfloat16) or torch's sdpa
    use_attention       run a model's attention through one of them within a block
"""
import contextlib

from common.cli import env_choice


SLICED_ATTENTION = "cotprune_sliced_sdpa"
EXACT_ENV = "COTPRUNE_EXACT_ATTENTION"


def exact_attention(dtype):
    """Whether decode attention runs slot by slot (see Engine): EXACT_ENV 1 / 0, else in float32 only."""
    import torch
    forced = env_choice(EXACT_ENV, ("0", "1"))
    return forced == "1" if forced else dtype == torch.float32


def _sliced_sdpa(module, query, key, value, attention_mask, cotprune_pieces=None, cotprune_rows=None,
                 cotprune_cache=None, **kwargs):
    """transformers' sdpa attention on slices, each through the same call, on the same shapes, as alone:
    - packed prefill, `cotprune_pieces` [(start, end, slot, past)] of the one sequence, attention_mask one causal
      mask per piece: each prompt attends to its own keys (with a past: to its slot's first past + its own
      positions in `cotprune_cache`) as when it is prefilled alone, so packing changes no bit;
    - exact decode, `cotprune_rows` [n per slot]: each slot reads only its own n cached positions, in a call of
      its own, as model.generate does for a prompt alone (see Engine.exact_attention)."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    if cotprune_pieces is not None:
        def kv(a, b, s, past):  # the keys a piece attends to: its own, or its slot's (written by update already)
            if not past:
                return key[:, :, a:b], value[:, :, a:b]
            i, n = module.layer_idx, past + b - a
            return cotprune_cache.k[i][s: s + 1, :, :n], cotprune_cache.v[i][s: s + 1, :, :n]
        outs = [sdpa_attention_forward(module, query[:, :, a:b], *kv(a, b, s, past), mask, **kwargs)[0]
                for (a, b, s, past), mask in zip(cotprune_pieces, attention_mask)]
        return torch.cat(outs, dim=1), None  # [1, T, heads, head_dim], as sdpa_attention_forward returns
    if cotprune_rows is not None:
        if _direct_sdpa_ok(key, value, kwargs):
            return _exact_decode(module, query, key, value, cotprune_rows, kwargs.get("scaling")), None
        outs = [sdpa_attention_forward(module, query[s: s + 1], key[s: s + 1, :, :n], value[s: s + 1, :, :n], None,
                                       **kwargs)[0] for s, n in enumerate(cotprune_rows)]
        return torch.cat(outs), None  # [slots, 1, heads, head_dim]
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _direct_sdpa_ok(key, value, kwargs):
    """Whether _exact_decode makes the very call transformers' sdpa_attention_forward would make for a one-token
    query with no mask: on the CPU or CUDA (where it then takes torch's grouped-query path), heads of at most 256,
    no dropout, softcap, position bias or paged cache. Anything else goes through sdpa_attention_forward itself."""
    if key.device.type not in ("cpu", "cuda") or not key.shape[-1] == value.shape[-1] <= 256:
        return False
    return not (kwargs.get("dropout") or kwargs.get("softcap") is not None or kwargs.get("output_attentions")
                or kwargs.get("position_bias") is not None or kwargs.get("cache") is not None)


def _exact_decode(module, query, key, value, rows, scaling):
    """Each slot's one-token attention over its own `rows[s]` cached positions, in a call of its own: the same
    torch.nn.functional.scaled_dot_product_attention call sdpa_attention_forward makes for the slot alone (same
    shapes and arguments, so the same bits), without its per-call Python (a fifth of exact decode attention at 64
    slots on the CPU, measured). The outputs are joined by one cat: writing each into a preallocated tensor cost
    10-15 us a slot (a sixth of the loop at 64 slots of ~140 positions, 2 AVX2 cores).
    query [slots, heads, 1, d] -> [slots, 1, heads, d]."""
    import torch
    sdpa = torch.nn.functional.scaled_dot_product_attention
    extra = {"enable_gqa": True} if getattr(module, "num_key_value_groups", 1) > 1 else {}
    return torch.cat([sdpa(query[s: s + 1], key[s: s + 1, :, :n], value[s: s + 1, :, :n], attn_mask=None,
                           dropout_p=0.0, scale=scaling, is_causal=False, **extra)
                      for s, n in enumerate(rows)]).transpose(1, 2)


BMM_ATTENTION = "cotprune_decode_bmm"


def batched_attention(dtype, device):
    """How decode attention runs when not slot by slot: 'bmm' (_decode_bmm) on the CPU in bfloat16, where torch's
    sdpa kernel runs one-token queries over the slot cache 1.3-3x slower than two batched matmuls (bench/README.md);
    'sdpa' elsewhere (float32 on the CPU: within -30..+20 %, measured; GPUs: sdpa's own kernels)."""
    import torch
    return "bmm" if device.type == "cpu" and dtype == torch.bfloat16 else "sdpa"


def _decode_bmm(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """One-token attention for every slot as transformers' eager attention computes it (scores in the model's
    dtype, the additive mask, softmax in float32, probabilities back in the model's dtype), batched over (slot,
    KV head) with a group's query heads as rows, so GQA needs no repeated keys: query [slots, heads, 1, d], key and
    value the whole contiguous cache [slots, kv_heads, length, d], attention_mask additive [slots, 1, length]."""
    import torch
    S, H, _, d = query.shape
    kvh, L = key.shape[1], key.shape[2]
    scores = torch.bmm(query.reshape(S * kvh, H // kvh, d), key.reshape(S * kvh, L, d).transpose(1, 2))
    scores = scores.mul_(d ** -0.5 if scaling is None else scaling).view(S, H, L).add_(attention_mask)
    p = torch.softmax(scores, -1, dtype=torch.float32).to(query.dtype)
    out = torch.bmm(p.view(S * kvh, H // kvh, L), value.reshape(S * kvh, L, d))
    return out.view(S, 1, H, d), None  # [slots, 1, heads, d], as the attention interface returns


@contextlib.contextmanager
def use_attention(model, name):
    """Run the model's attention through the registered function `name` within the block (restored after)."""
    from transformers import AttentionInterface
    AttentionInterface.register(SLICED_ATTENTION, _sliced_sdpa)
    AttentionInterface.register(BMM_ATTENTION, _decode_bmm)
    old = model.config._attn_implementation
    model.config._attn_implementation = name
    try:
        yield
    finally:
        model.config._attn_implementation = old
