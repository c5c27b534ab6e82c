"""KV caches the engine writes in place: the per-slot SlotCache of continuous batching, and a DynamicCache that
reserves room (for static batches through the model's own forward).

Both speak transformers' cache protocol (`update(key, value, layer_idx)`, DynamicLayer), kept in one room so that an
upgrade breaks one file.
"""


def preallocated_cache(model, extra):
    """A DynamicCache whose full-attention layers reserve room for `extra` more positions and write in place.

    The stock DynamicLayer concatenates, copying the whole cache at every step: a fifth of CPU decode time for a
    135M model at batch 16, growing with length. Layers of other kinds (sliding windows) are left as they are.
    """
    import torch
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    class PreallocatedLayer(DynamicLayer):
        def update(self, key_states, value_states, *args, **kwargs):
            T = key_states.shape[-2]
            if not self.is_initialized:
                self.dtype, self.device, self.n = key_states.dtype, key_states.device, 0
                shape = list(key_states.shape)
                shape[-2] += extra
                self.k_buf, self.v_buf = key_states.new_empty(shape), value_states.new_empty(shape)
                self.is_initialized = True
            if self.n + T > self.k_buf.shape[-2]:  # more than reserved: grow by concatenation once
                self.k_buf = torch.cat([self.k_buf, torch.empty_like(self.k_buf)], dim=-2)
                self.v_buf = torch.cat([self.v_buf, torch.empty_like(self.v_buf)], dim=-2)
            self.k_buf[:, :, self.n: self.n + T] = key_states
            self.v_buf[:, :, self.n: self.n + T] = value_states
            self.n += T
            self.keys, self.values = self.k_buf[:, :, : self.n], self.v_buf[:, :, : self.n]
            return self.keys, self.values

        def batch_select_indices(self, indices):
            self.k_buf, self.v_buf = self.k_buf[indices], self.v_buf[indices]
            self.keys, self.values = self.k_buf[:, :, : self.n], self.v_buf[:, :, : self.n]

    cache = DynamicCache(config=model.config)
    cache.layers = [PreallocatedLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


BUCKET = 64  # SlotCache grows and shrinks in steps of this many positions


class SlotCache:
    """A KV cache with one row per slot, written in place by the model's own attention modules through the cache
    protocol they call (`update(key, value, layer_idx)`): K, V [slots, kv_heads, length, head_dim] per layer.
    Before each forward the engine says where the new keys go (`at_decode`, `at_prefill`, `at_packed`).

    `length` follows the longest row in steps of `bucket` positions (reserve), up to `capacity`, so that each
    layer's K and V are one contiguous block that decode attention reads whole as two plain batched matmuls
    (_decode_bmm; torch's CPU bfloat16 matmul takes a far slower path on a strided slice of a longer buffer). The
    memory is allocated once, at capacity (one flat buffer per layer and tensor; K and V are views of its start);
    a resize lays the kept positions out again through one scratch copy (30-75 ms for SmolLM2 at 64 slots and
    192-576 positions, measured; fresh allocations took 0.6-1.4 s, in page faults), once per `bucket` steps at most."""

    def __init__(self, layers, slots, kv_heads, capacity, head_dim, dtype, device, bucket=None):
        import torch
        self.bufs = [torch.zeros(slots * kv_heads * capacity * head_dim, dtype=dtype, device=device)
                     for _ in range(2 * layers)]
        self.shape, self.capacity, self.bucket = (slots, kv_heads, head_dim), capacity, bucket or BUCKET
        self.length, self.mode, self.resizes = 0, None, 0
        self._views()

    def _views(self):
        n, h, d = self.shape
        views = [b[: n * h * self.length * d].view(n, h, self.length, d) for b in self.bufs]
        self.k, self.v = views[0::2], views[1::2]

    def _relayout(self, length, slots=None):
        """Lay every buffer out as [slots, kv_heads, length, head_dim], keeping the first min(old, new) positions of
        each slot (of the slots in `slots`, in that order, if given). Old and new places overlap in the buffer, so
        the kept positions go through a scratch copy; positions past them are zeroed (masked, and never garbage)."""
        import torch
        n, h, d = self.shape
        keep, m = min(length, self.length), n if slots is None else len(slots)
        scratch = self.bufs[0].new_empty(m, h, keep, d)
        for b in self.bufs:
            old = b[: n * h * self.length * d].view(n, h, self.length, d)[:, :, :keep]
            if slots is None:
                scratch.copy_(old)
            else:
                torch.index_select(old, 0, slots, out=scratch)
            new = b[: m * h * length * d].view(m, h, length, d)
            new[:, :, :keep] = scratch
            new[:, :, keep:] = 0
        self.shape, self.length = (m, h, d), length
        self._views()

    def reserve(self, n, shrink=False):
        """Hold at least n positions per slot (n <= capacity), rounded up to whole buckets; with shrink, also give
        back the buckets past n's when that cuts a quarter of the cache (every slot must then have its keys below
        n: decode, where n is past the longest row)."""
        want = min(self.capacity, -(-n // self.bucket) * self.bucket)
        if want > self.length or (shrink and want <= self.length * 3 // 4):
            self._relayout(want)
            self.resizes += 1

    def at_decode(self, positions, kv_len):
        """Every slot writes one key at its own position [slots]; attention reads the first kv_len positions (all
        `length` of them, for _decode_bmm). reserve(kv_len) first."""
        import torch
        self.mode, self.kv_len = "decode", kv_len
        # Flat row of (slot, head, position) in a [slots * heads * length, head_dim] view: one index_copy_ per
        # tensor, about half the time of the advanced-indexing write K[rows, :, pos] (18 against 32 us at 64 slots
        # on 2 AVX2 cores; the same values).
        slots, heads = self.k[0].shape[:2]
        base = torch.arange(slots * heads, device=positions.device).view(slots, heads) * self.length
        self.flat = (base + positions[:, None]).reshape(-1)

    def at_prefill(self, slot, start, end):
        """Slot `slot` writes keys for positions start..end-1 and reads positions 0..end-1."""
        self.mode, self.slot, self.start, self.end = "prefill", slot, start, end

    def at_packed(self, pieces):
        """Several prompts in one sequence: pieces [(slot, start, end, past)] in the sequence; each writes its keys
        to its slot from position `past` (0 for a whole prompt; after a copied shared prefix, its length) and
        attention reads the sequence's own keys, or the slot's where the piece has a past (_sliced_sdpa)."""
        self.mode, self.pieces = "packed", pieces

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        K, V = self.k[layer_idx], self.v[layer_idx]
        if self.mode == "decode":  # key_states [slots, kv_heads, 1, head_dim]
            d = K.shape[-1]
            K.view(-1, d).index_copy_(0, self.flat, key_states.reshape(-1, d))
            V.view(-1, d).index_copy_(0, self.flat, value_states.reshape(-1, d))
            return K[:, :, : self.kv_len], V[:, :, : self.kv_len]
        if self.mode == "packed":
            for s, a, b, past in self.pieces:
                K[s, :, past: past + b - a] = key_states[0, :, a:b]
                V[s, :, past: past + b - a] = value_states[0, :, a:b]
            return key_states, value_states
        s = self.slot  # prefill: key_states [1, kv_heads, T, head_dim]
        K[s, :, self.start: self.end] = key_states[0]
        V[s, :, self.start: self.end] = value_states[0]
        return K[s: s + 1, :, : self.end], V[s: s + 1, :, : self.end]

    def keep(self, slots):
        """Keep only these slots [tensor of slot indices], in this order: the batch shrinks once the queue is empty."""
        self._relayout(self.length, slots)
