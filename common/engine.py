"""The generation engine: continuous batching over a per-slot KV cache, and packed CPU linears.

This is the code that leans on library internals (the decoder blocks' call, private torch.ops.mkldnn ops), kept in
one room so that an upgrade breaks one file; its caches are in common/kvcache.py, its attention functions in
common/attention.py, its written-out decode step in common/decodestep.py. Each fast path checks itself and steps
aside where it cannot run.

    Engine          continuous batching: a fixed number of slots; a finished row's slot takes the next prompt at once
    decode          static batches through the model's own forward (the fallback for architectures Engine does not
                    drive, and the reference the tests compare with)
    fast_linears    bfloat16 and float32 weights packed once for oneDNN on CPUs where a probe shows it safe
    eos_token_ids   every token id that ends a generation
    row_generator   one problem's sampling stream, seeded by its id
"""
import contextlib
import os
import time

from common.attention import BMM_ATTENTION, SLICED_ATTENTION, batched_attention, exact_attention, use_attention
from common.cli import env_choice
from common.decodestep import LINEAR_ATTR, Stepper, stepper_supported
from common.kvcache import SlotCache, preallocated_cache
from common.runtime import BF16_ENV


def row_generator(device, seed, key):
    """The sampling stream of one problem: seeded by the run's seed and the problem's id alone, so a sampled answer
    does not depend on which problems share the batch with it, nor on whether the run was resumed."""
    import zlib
    import torch
    return torch.Generator(device).manual_seed(seed * 1_000_003 + zlib.crc32(str(key).encode()))


def eos_token_ids(model, tokenizer):
    """Every token id that ends a generation: the generation config's (one or a list) and the tokenizer's."""
    ids = model.generation_config.eos_token_id
    ids = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def _pick(logits, temperature, top_k, top_p, generator):
    """Next tokens [B] from logits [B, V]: argmax when temperature is 0, else HF-style warped sampling."""
    import torch
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=False)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum <= 1 - top_p
        drop[:, -1] = False  # always keep the most likely token
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


@contextlib.contextmanager
def fast_linears(model):
    """Within the block, run the model's CPU nn.Linear layers (bfloat16 or float32) through oneDNN with each weight
    packed once, instead of through the default kernels. Yields True if the packed path is in use.

    bfloat16: the same numbers bit for bit, 1.4-1.8x faster matmuls than repacking at every call (Zen 4 EPYC with
    avx512_bf16). float32: a decode step's linears 1.4x (64 rows) to 1.9x (16 rows) faster than MKL's sgemm on a
    2-core AVX2 EPYC (docs/methods.md),
    and batch-invariant: MKL rounded a row differently alone and among 16 rows there, the packed kernel gave every
    row the same bits whatever the batch, which is what makes float32 tokens independent of their batch-mates. The
    float32 numbers are not F.linear's bit for bit (another summation order), so a run is consistent with itself,
    not with an unpacked run.

    It steps aside (yields False, changes nothing) on GPUs, for other dtypes, without oneDNN, where COTPRUNE_CPU_BF16=0
    (bfloat16 only), or if a probe on the first layer fails: bfloat16 must equal F.linear bit for bit (oneDNN's
    bfloat16 path raises on AVX2-only CPUs), float32 must agree with F.linear to rounding and give each row the same
    bits alone and in batches. The packed copies live only inside the block; the modules are restored on exit.
    """
    import torch
    mods = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m.weight.device.type == "cpu"
            and m.weight.dtype in (torch.bfloat16, torch.float32)]
    dtypes = {m.weight.dtype for m in mods}
    if not (len(dtypes) == 1 and torch.backends.mkldnn.is_available()
            and not (torch.bfloat16 in dtypes and os.environ.get(BF16_ENV) == "0")
            and _packed_linear_works(mods[0])):
        yield False
        return
    pack = lambda w: torch.ops.mkldnn._reorder_linear_weight(w.detach(), 16)
    linear = lambda x, w, b: torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
    for m in mods:
        m.forward = lambda x, w=pack(m.weight), b=m.bias: linear(x, w, b)
    # Read by the written-out decode step (its stacked projections) and by Engine, which packs float32 prompts only
    # on these linears: the probe checked that they give a row the same bits alone and among others.
    setattr(model, LINEAR_ATTR, (pack, linear))
    try:
        yield True
    finally:
        delattr(model, LINEAR_ATTR)
        for m in mods:
            del m.forward  # back to nn.Linear.forward


def _packed_linear_works(mod):
    """Does oneDNN's packed linear run here and agree with F.linear (bfloat16: bit for bit; float32: to rounding,
    and with every row's bits the same alone as among 2, 5, 16 or 17 rows, 2-D or 3-D)?"""
    import torch
    lin = lambda x, w: torch.ops.mkldnn._linear_pointwise(x, w, mod.bias, "none", [], "")
    x = torch.randn(17, mod.in_features, generator=torch.Generator().manual_seed(0)).to(mod.weight.dtype)
    try:
        with torch.no_grad():
            w = torch.ops.mkldnn._reorder_linear_weight(mod.weight.detach(), 16)
            got, want = lin(x, w), torch.nn.functional.linear(x, mod.weight, mod.bias)
            if mod.weight.dtype == torch.bfloat16:
                return torch.equal(got, want)
            alone = torch.cat([lin(x[i: i + 1], w) for i in range(len(x))])
            return (torch.allclose(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))
                    and torch.equal(got, alone) and torch.equal(lin(x[None], w)[0], got)
                    and all(torch.equal(lin(x[:n], w), alone[:n]) for n in (2, 5, 16)))
    except (RuntimeError, AttributeError):  # AVX2-only CPUs: "bf16 path needs the cpu support avx_ne_convert or ..."
        return False


def decode(model, prompts, max_new_tokens, eos_ids, pad_id, stop_fn=None,
           temperature=0.0, top_k=0, top_p=1.0, generator=None):
    """Generate for a batch of tokenised prompts; returns [(new token ids, reason)] in prompt order.

    reason is 'eos', 'length' or 'stop' (stop_fn(row_index, ids) returned True). Prompts are left-padded;
    a finished row is dropped from the batch and the KV cache at once, so the remaining rows run at full speed.
    Greedy results equal model.generate's for the same batch.
    """
    import torch
    device = model.device
    B, L = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((B, L), pad_id, dtype=torch.long)
    mask = torch.zeros((B, L), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, L - len(p):] = torch.tensor(p)
        mask[i, L - len(p):] = 1
    ids, mask = ids.to(device), mask.to(device)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)  # real tokens at 0.., as generate() does for left padding
    eos = torch.tensor(sorted(eos_ids), device=device)
    cache = preallocated_cache(model, max_new_tokens)
    out_ids = [[] for _ in range(B)]
    reasons = ["length"] * B
    alive = list(range(B))  # original row of each batch row still running
    with torch.inference_mode():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
                       use_cache=True, logits_to_keep=1).logits[:, -1, :]
        next_pos = pos[:, -1:] + 1
        for step in range(max_new_tokens):
            tok = _pick(logits, temperature, top_k, top_p, generator)
            done_now = torch.isin(tok, eos).tolist()
            toks = tok.tolist()
            keep = []
            for j, r in enumerate(alive):
                out_ids[r].append(toks[j])
                if done_now[j]:
                    reasons[r] = "eos"
                elif stop_fn is not None and stop_fn(r, out_ids[r]):
                    reasons[r] = "stop"
                elif step + 1 < max_new_tokens:
                    keep.append(j)
            if not keep:
                break
            if len(keep) < len(alive):
                sel = torch.tensor(keep, device=device)
                for layer in cache.layers:
                    layer.batch_select_indices(sel)
                tok, mask, next_pos = tok[sel], mask[sel], next_pos[sel]
                alive = [alive[j] for j in keep]
            mask = torch.cat([mask, mask.new_ones((len(alive), 1))], dim=1)
            logits = model(input_ids=tok[:, None], attention_mask=mask, position_ids=next_pos,
                           past_key_values=cache, use_cache=True).logits[:, -1, :]
            next_pos = next_pos + 1
    return list(zip(out_ids, reasons))


# --------------------------------------------------------------------------------------- continuous batching

MIN_SHARED = 16  # a shared prefix shorter than this is prefilled with the rest of the prompt: not worth a copy


def _common_length(a, b):
    """How many leading tokens the sequences a and b share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def engine_supported(model):
    """(True, '') if Engine can drive this model's decoder blocks with its own cache and masks, else (False, why).

    Engine calls each block as the model's forward does (hidden states, rotary embeddings, a 4-D additive mask, a
    cache), so any pre-norm decoder whose attention goes through transformers' sdpa or eager interface and reads
    the cache protocol works (Llama, Qwen2, Mistral without a sliding window, ...). Sliding-window and other
    non-full attention needs masks Engine does not build."""
    cfg, inner = model.config, getattr(model, "model", None)
    if inner is None or not hasattr(inner, "layers") or not hasattr(inner, "rotary_emb") \
            or not hasattr(inner, "embed_tokens") or not hasattr(inner, "norm"):
        return False, f"{type(model).__name__} is not a decoder with model.layers / rotary_emb / embed_tokens / norm"
    if getattr(cfg, "_attn_implementation", "sdpa") not in ("sdpa", "eager"):
        return False, f"attention implementation {cfg._attn_implementation!r}"
    if any(t != "full_attention" for t in (getattr(cfg, "layer_types", None) or [])):
        return False, "some layers use sliding-window or other non-full attention"
    if any(getattr(layer.self_attn, "sliding_window", None) for layer in inner.layers):
        return False, "sliding-window attention"
    if not all(hasattr(layer, "self_attn") and hasattr(layer.self_attn, "layer_idx") for layer in inner.layers):
        return False, "attention modules without layer_idx"
    return True, ""


class Engine:
    """Continuous batching: `slots` rows decode together; when one ends (EOS, a stop, the cap) the next waiting
    prompt is prefilled into its slot at once, so the batch stays full until the queue is empty. Each slot has its
    own rows in the KV cache (SlotCache) and its own position, so a row's tokens never depend on which prompts share
    the batch with it except through floating-point rounding (none in float32 on batch-invariant linears with exact
    decode attention, checked against model.generate at batch 1 in the tests). Prompts that arrive together are
    prefilled packed, up to `chunk` tokens a pass (prefill_packed); a longer prompt alone, in chunks of `chunk`.
    Rows given a shared prefix copy its keys, prefilled once, and compute only the rest (generate).

    generate() yields (key, new token ids, reason, seconds from its prefill to its last token) as rows finish;
    `stats` then holds prefill and decode seconds, decode steps, the mean number of busy slots and the prompt
    tokens copied from shared prefixes."""

    def __init__(self, model, slots, capacity, chunk=512):
        import torch
        ok, why = engine_supported(model)
        if not ok:
            raise ValueError(f"Engine cannot drive this model: {why}")
        self.model, self.inner, self.slots, self.chunk = model, model.model, slots, chunk
        cfg = model.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        self.dtype, self.device = next(model.parameters()).dtype, model.device
        self.cache = SlotCache(len(self.inner.layers), slots, kv_heads, capacity, head_dim, self.dtype, self.device)
        self.neg = torch.finfo(self.dtype).min  # additive mask: finite, so a fully masked idle slot gives no NaN
        self.stats = {"prefill_seconds": 0.0, "decode_seconds": 0.0, "decode_steps": 0, "busy_slot_steps": 0,
                      "prefilled_rows": 0, "shared_prefix_tokens": 0, "slots": slots}
        # Packed prefill and exact decode need the attention to be sdpa (_sliced_sdpa wraps it); eager models
        # prefill one by one. In float32 _fill also asks for row-invariant linears.
        self.sdpa = getattr(cfg, "_attn_implementation", "sdpa") == "sdpa"
        self.pack_prompts = self.sdpa
        # Exact decode attention (sdpa only): every slot's attention in a call of its own over its own positions,
        # as model.generate computes a prompt alone. torch's CPU sdpa kernel rounds a row differently with the
        # number of rows in the call (on more than one thread) and the number of keys it reads (masked ones too),
        # so in one batched call a row's attention depends on its batch-mates in the last bits. Exact makes a
        # float32 row independent of them by construction, at 5-18 % of a decode step (B 16-64, measured); on in
        # float32, where that is promised, off in bfloat16, where nothing is. EXACT_ENV=1 / 0 forces it either way.
        self.exact_attention = exact_attention(self.dtype) and self.sdpa
        # Otherwise one batched call: _decode_bmm where it is faster (batched_attention), else the model's own.
        self.bmm_attention = not self.exact_attention and batched_attention(self.dtype, self.device) == "bmm"
        # Decode steps through the written-out decoder layers where they are ones it knows (the same bits; a step
        # 4-10 %, a run ~5 % faster on 2 Zen 4 cores), else through the model's modules; prefill always through them.
        self.stepper = Stepper(model) if stepper_supported(model)[0] else None

    def _blocks(self, h, position_ids, mask, **extra):
        """The decoder blocks and the final norm on hidden states h [B, T, d] -> [B, T, d]."""
        pe = self.inner.rotary_emb(h, position_ids=position_ids)
        for layer in self.inner.layers:
            h = layer(h, attention_mask=mask, position_ids=position_ids, past_key_values=self.cache,
                      use_cache=True, position_embeddings=pe, **extra)
            h = h[0] if isinstance(h, tuple) else h
        return self.inner.norm(h)

    def _decode_blocks(self, h, position_ids, mask, **extra):
        """_blocks on one token per slot: through the written-out step where it knows the layers (decodestep.py)."""
        if self.stepper is not None:
            return self.stepper.blocks(h, position_ids, mask, self.cache, **extra)
        return self._blocks(h, position_ids, mask, **extra)

    def _causal(self, start, end):
        """The additive mask [1, 1, end - start, end] of positions start..end-1 over keys 0..end-1."""
        import torch
        pos = torch.arange(start, end, device=self.device)
        causal = torch.arange(end, device=self.device)[None, :] <= pos[:, None]
        return torch.zeros(1, 1, end - start, end, dtype=self.dtype, device=self.device).masked_fill_(~causal, self.neg)

    def prefill_packed(self, items):
        """Prefill several prompts [(slot, ids, past)] (each at most `chunk` tokens past `past`) in one pass: one
        sequence through the Linear layers, each prompt's attention on its own (see _sliced_sdpa). A prompt with a
        past has its first `past` positions in its slot already (a copied shared prefix) and computes the rest.
        Returns the logits of each prompt's last position [len(items), V]. Worth it on the CPU, where a matmul over
        a few dozen rows runs far below the machine's rate: 64 prompts of ~70 tokens cost 64 passes through 30
        layers one by one."""
        import torch
        ends, pieces, a = [], [], 0
        for slot, ids, past in items:
            pieces.append((slot, a, a + len(ids) - past, past))
            a += len(ids) - past
            ends.append(a - 1)
        x = torch.tensor([[t for _, ids, past in items for t in ids[past:]]], device=self.device)
        pos = torch.cat([torch.arange(past, len(ids), device=self.device) for _, ids, past in items])[None]
        masks = [self._causal(past, len(ids)) for _, ids, past in items]
        self.cache.reserve(max(len(ids) for _, ids, _ in items))
        self.cache.at_packed(pieces)
        with use_attention(self.model, SLICED_ATTENTION):
            h = self._blocks(self.inner.embed_tokens(x), pos, masks, cotprune_cache=self.cache,
                             cotprune_pieces=[(a, b, s, past) for s, a, b, past in pieces])
        return self.model.lm_head(h[0, ends]).float()

    def prefill(self, slot, ids, keep=1, start=0):
        """Write a prompt's keys into `slot` (chunk by chunk) and return the logits of its last `keep` positions.
        With `start`, positions before it are already in the slot (a shared prefix) and only the rest is computed."""
        import torch
        T = len(ids)
        if T + 1 > self.cache.capacity:
            raise ValueError(f"a prompt of {T} tokens does not fit a cache of {self.cache.capacity} positions")
        self.cache.reserve(T)
        out = []
        for a in range(start, T, self.chunk):
            b = min(T, a + self.chunk)
            x = torch.tensor([ids[a:b]], device=self.device)
            pos = torch.arange(a, b, device=self.device)[None]
            self.cache.at_prefill(slot, a, b)
            h = self._blocks(self.inner.embed_tokens(x), pos, self._causal(a, b))
            if b > T - keep:
                out.append(h[0, max(0, T - keep - a):])
        return self.model.lm_head(torch.cat(out)).float()  # [keep, V]

    def _step(self, tokens, positions, kv_len):
        """One token for every slot: tokens, positions [slots] -> logits [slots, V]."""
        import torch
        self.cache.reserve(kv_len, shrink=True)
        x, pos = self.inner.embed_tokens(tokens[:, None]), positions[:, None]
        if self.bmm_attention:  # over the whole cache, contiguous: positions past a slot's own are masked
            L = self.cache.length
            self.cache.at_decode(positions, L)
            seen = torch.arange(L, device=self.device)[None, :] <= positions[:, None]
            mask = torch.zeros(len(positions), 1, L, dtype=self.dtype, device=self.device)
            with use_attention(self.model, BMM_ATTENTION):
                h = self._decode_blocks(x, pos, mask.masked_fill_(~seen[:, None], self.neg))
            return self.model.lm_head(h[:, 0]).float()
        self.cache.at_decode(positions, kv_len)
        if self.exact_attention:  # each slot reads exactly its own positions: no mask at all
            with use_attention(self.model, SLICED_ATTENTION):
                h = self._decode_blocks(x, pos, None, cotprune_rows=(positions + 1).tolist())
            return self.model.lm_head(h[:, 0]).float()
        seen = torch.arange(kv_len, device=self.device)[None, :] <= positions[:, None]
        # sdpa takes the boolean mask as is (the same bits as the additive one, attention ~10 % faster on the CPU:
        # no mask to add); eager attention adds its mask, so it gets the additive form.
        mask = seen if self.sdpa else torch.where(seen, 0.0, self.neg).to(self.dtype)
        h = self._decode_blocks(x, pos, mask[:, None, None, :])
        return self.model.lm_head(h[:, 0]).float()

    def generate(self, requests, max_new_tokens, eos_ids, stop_fn=None, temperature=0.0, top_k=0, top_p=1.0):
        """requests: [(key, prompt ids, torch.Generator or None[, prefix ids])], served in order. Yields (key, ids,
        reason, seconds) with reason 'eos', 'length' or 'stop' (stop_fn(key, ids) returned True), as rows finish.

        A request with a prefix (token ids that prompts of several requests begin with, e.g. one problem's prompt
        and chain of thought) reuses its keys: the prefix is prefilled once, alone, as a prompt of its own, and
        each such row copies the positions its prompt shares with it and prefills only the rest. A row's keys
        then depend on its own prefix and prompt only, never on the queue or the batch, so float32's
        independence of batch-mates holds; they are not bit for bit those of prefilling the prompt whole."""
        import torch
        # each request as (key, ids, generator, prefix as a tuple or None); a prefix of one row alone saves nothing
        requests = [(r[0], r[1], r[2], tuple(r[3]) if len(r) > 3 and r[3] is not None else None) for r in requests]
        self.prefixes, self.prefix_uses = {}, {}  # a prefix's keys; how many of its rows are still queued
        for r in requests:
            self.prefix_uses[r[3]] = self.prefix_uses.get(r[3], 0) + 1
        requests = [r if self.prefix_uses[r[3]] > 1 else r[:3] + (None,) for r in requests]
        queue = list(reversed(requests))
        rows = [None] * self.slots  # per slot: [key, ids, generator, position of its next token, start time]
        eos = set(eos_ids)
        with torch.inference_mode():
            while queue or any(rows):
                while queue and None in rows:  # fill the free slots (again if a row ends at its first token)
                    for s, logits in self._fill(rows, queue):
                        done = self._advance(rows[s], logits, eos, max_new_tokens, stop_fn, temperature, top_k, top_p)
                        if done:
                            rows[s] = None
                            yield done
                busy = [s for s, r in enumerate(rows) if r is not None]
                if not busy:
                    break
                if not queue and len(busy) <= len(rows) // 2:  # the tail: shrink the batch to the busy slots
                    self.cache.keep(torch.tensor(busy, device=self.device))
                    rows = [rows[s] for s in busy]
                    busy = list(range(len(rows)))
                positions = torch.tensor([r[3] if r else 0 for r in rows], device=self.device)
                tokens = torch.tensor([r[1][-1] if r else 0 for r in rows], device=self.device)
                t0 = time.perf_counter()
                logits = self._step(tokens, positions, int(positions.max()) + 1)
                self.stats["decode_seconds"] += time.perf_counter() - t0
                self.stats["decode_steps"] += 1
                self.stats["busy_slot_steps"] += len(busy)
                for s in busy:
                    rows[s][3] += 1
                picks = self._pick_rows([rows[s] for s in busy], logits[busy], temperature, top_k, top_p)
                for s, tok in zip(busy, picks):
                    done = self._finish_token(rows[s], tok, eos, max_new_tokens, stop_fn)
                    if done:
                        rows[s] = None
                        yield done

    def _fill(self, rows, queue):
        """Take the next waiting prompts into the free slots and prefill them at once: the short ones packed
        together up to `chunk` tokens a pass (where the attention is sdpa), longer ones alone in chunks. Returns
        [(slot, logits of the prompt's last position [1, V])].

        In float32 prompts are packed only on row-invariant linears (fast_linears' probe), where packing changes
        no bit; on others (MKL's float32 sgemm is not row-invariant) a prompt's logits would depend on the prompts
        prefilled with it, breaking float32's independence of batch-mates. bfloat16 promises no such thing.
        A row with a shared prefix (generate) copies the prefix's keys into its slot and prefills the rest, packed
        with the other rows' rests in the same way."""
        import torch
        taken, shared = [], []
        for s in [s for s, r in enumerate(rows) if r is None][: len(queue)]:
            key, ids, gen, prefix = queue.pop()
            rows[s] = [key, [], gen, len(ids), time.perf_counter()]
            if prefix is not None:
                self.prefix_uses[prefix] -= 1
            n = 0 if prefix is None else min(_common_length(ids, prefix), len(ids) - 1)  # >= 1 position computed
            if n >= MIN_SHARED:
                shared.append((s, ids, prefix, n))
            else:
                taken.append((s, ids))
        # A prefix seen for the first time is prefilled as a prompt of its own, into the slot of its first row and
        # packed with the other prompts; only its keys are kept (for its rows), not its logits.
        first = {}
        for s, _, prefix, _ in shared:
            if prefix not in self.prefixes:
                first.setdefault(prefix, s)
        t0, out, pack = time.perf_counter(), [], []

        def flush():
            if pack:
                out.extend((s, lg[None]) for (s, *_), lg in zip(pack, self.prefill_packed(pack)))
                pack.clear()
        pack_ok = self.pack_prompts and (self.dtype != torch.float32 or hasattr(self.model, LINEAR_ATTR))

        def prefill_all(items):  # [(slot, ids, past)]: packed where it may, else alone
            for s, ids, past in items:
                if not (pack_ok and len(ids) - past <= self.chunk):
                    out.append((s, self.prefill(s, ids, start=past)))
                    continue
                if sum(len(p) - q for _, p, q in pack) + len(ids) - past > self.chunk:
                    flush()
                pack.append((s, ids, past))
            flush()
        prefill_all([(s, list(prefix), 0) for prefix, s in first.items()] + [(s, ids, 0) for s, ids in taken])
        out = [(s, lg) for s, lg in out if s not in first.values()]  # a prefix's logits are not a row's
        for prefix, s in first.items():
            n = len(prefix)
            self.prefixes[prefix] = ([k[s, :, :n].clone() for k in self.cache.k],
                                     [v[s, :, :n].clone() for v in self.cache.v])
        suffixes = []
        if shared:
            self.cache.reserve(max(len(ids) for _, ids, _, _ in shared))
        for s, ids, prefix, n in shared:
            for K, V, k, v in zip(self.cache.k, self.cache.v, *self.prefixes[prefix]):
                K[s, :, :n], V[s, :, :n] = k[:, :n], v[:, :n]
            suffixes.append((s, ids, n))
            self.stats["shared_prefix_tokens"] += n
        prefill_all(suffixes)
        for prefix in [p for p in self.prefixes if not self.prefix_uses[p]]:  # its last row is in: keys not needed
            del self.prefixes[prefix]
        self.stats["prefill_seconds"] += time.perf_counter() - t0
        self.stats["prefilled_rows"] += len(taken) + len(shared)  # each makes its first token from its prefill
        return out

    def _advance(self, row, logits, eos, max_new, stop_fn, temperature, top_k, top_p):
        tok = self._pick_rows([row], logits[-1:], temperature, top_k, top_p)[0]
        return self._finish_token(row, tok, eos, max_new, stop_fn)

    @staticmethod
    def _pick_rows(rows, logits, temperature, top_k, top_p):
        """Next token of each row: argmax, or a draw from the row's own generator (so it ignores its batch-mates)."""
        if temperature == 0:
            return logits.argmax(-1).tolist()
        return [int(_pick(logits[i: i + 1], temperature, top_k, top_p, row[2])[0]) for i, row in enumerate(rows)]

    def _finish_token(self, row, tok, eos, max_new, stop_fn):
        """Append the token; (key, ids, reason, seconds) if the row is done, else None."""
        key, ids = row[0], row[1]
        ids.append(tok)
        reason = ("eos" if tok in eos else "stop" if stop_fn is not None and stop_fn(key, ids)
                  else "length" if len(ids) >= max_new or row[3] >= self.cache.capacity else None)
        return None if reason is None else (key, ids, reason, time.perf_counter() - row[4])


def default_slots(model, capacity, device):
    """Slots for --batch-size 0: as many as keep the KV cache under a quarter of the memory the machine has free
    (or the GPU's), at most 64 (where a 2-core CPU stops gaining, bench/README.md) and 256 on a GPU."""
    import torch
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    per_slot = 2 * cfg.num_hidden_layers * kv * head_dim * capacity * next(model.parameters()).element_size()
    if device.type == "cuda":
        free, cap = torch.cuda.mem_get_info(device)[0], 256
    else:
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            free = 8 * 2**30
        cap = 64
    return max(1, min(cap, int(free / 4 // per_slot)))


ENGINE_ENV = "COTPRUNE_ENGINE"  # static: every run in static batches, as before continuous batching (for A/B timing)


def forced_static():
    """Whether ENGINE_ENV asks for static batches (`static`) rather than the engine (`continuous`, or unset)."""
    return env_choice(ENGINE_ENV, ("continuous", "static")) == "static"


def run(model, requests, max_new_tokens, eos_ids, pad_id, slots, stop_fn=None, temperature=0.0, top_k=0, top_p=1.0,
        stats=None):
    """Generate for [(key, prompt ids, generator or None[, shared prefix ids])] (Engine.generate) and yield (key, ids,
    reason, seconds) as rows finish:
    through Engine where it can drive the model, else in static batches of `slots` through decode() (sampled rows
    then share one generator per batch), as also where ENGINE_ENV is `static`. `stats` (a dict) receives the
    engine's counters and which path ran."""
    stats = {} if stats is None else stats
    ok, why = (False, f"{ENGINE_ENV}=static") if forced_static() else engine_supported(model)
    if not requests:
        return
    if ok:
        capacity = max(max(len(r[1]), len(r[3]) if len(r) > 3 and r[3] is not None else 0)
                       for r in requests) + max_new_tokens + 1
        eng = Engine(model, max(1, min(slots, len(requests))), capacity)
        stats.update(engine="continuous", engine_reason="")
        try:
            yield from eng.generate(requests, max_new_tokens, eos_ids, stop_fn, temperature, top_k, top_p)
        finally:
            stats.update(eng.stats, mean_busy_slots=eng.stats["busy_slot_steps"] / max(eng.stats["decode_steps"], 1),
                         decode_attention="slot by slot" if eng.exact_attention
                         else "batched (bmm)" if eng.bmm_attention else "batched",
                         decode_step="written out" if eng.stepper is not None else "the model's modules",
                         cache_resizes=eng.cache.resizes)
        return
    stats.update(engine="static", engine_reason=why, prefill_seconds=None, decode_seconds=None, slots=slots)
    for i in range(0, len(requests), slots):
        batch = requests[i: i + slots]
        t0 = time.perf_counter()
        gen = batch[0][2]
        results = decode(model, [r[1] for r in batch], max_new_tokens, eos_ids, pad_id,
                         None if stop_fn is None else (lambda r, ids, b=batch: stop_fn(b[r][0], ids)),
                         temperature, top_k, top_p, gen)
        seconds = (time.perf_counter() - t0) / len(batch)
        for (key, *_), (ids, reason) in zip(batch, results):
            yield key, ids, reason, seconds
