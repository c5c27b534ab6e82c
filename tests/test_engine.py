"""common/engine.py's continuous batching against model.generate at batch 1, the reference a user would trust."""
import contextlib

import pytest
import torch

from common.attention import _exact_decode, exact_attention
from common.engine import Engine, decode, engine_supported, fast_linears, row_generator, run
from common.kvcache import SlotCache
from common.models import load_model, load_tokenizer


def prompts_of(tok, n):
    """n prompts of different lengths (so slots hold rows at different positions)."""
    words = "the cat sat on a mat while two dogs ran far away from home".split()
    return [tok(" ".join(words[: 2 + 3 * i % len(words)]) + f" {i}")["input_ids"] for i in range(n)]


def greedy_no_cache(model, prompt, max_new):
    """Greedy tokens by recomputing the whole sequence at every step: no cache at all, no EOS."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(max_new):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def reference(model, prompt, max_new, eos):
    """Greedy tokens from model.generate on one prompt alone (no batch-mates, no padding)."""
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new, do_sample=False, eos_token_id=eos,
                             pad_token_id=eos)
    ids = out[0, len(prompt):].tolist()
    return ids[: ids.index(eos) + 1] if eos in ids else ids


@pytest.mark.parametrize("packed", [False, True], ids=["default-linears", "packed-linears"])
@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_qwen"])
def test_float32_greedy_equals_model_generate_at_batch_1(arch, packed, request):
    """Seven prompts through three slots: rows finish at different steps (an EOS chosen so some stop early) and
    their slots are refilled; every row's tokens must equal model.generate's for that prompt alone, with the
    default linears and with the packed ones generate.py uses (both sides under the same linears)."""
    path = request.getfixturevalue(arch)
    tok, model = load_tokenizer(path), load_model(path, torch.device("cpu"), torch.float32)
    with linears(model, packed):
        check_engine_against_generate(tok, model)


@contextlib.contextmanager
def linears(model, packed):
    """The default linears, or (packed) generate.py's packed ones; skips where the packed ones cannot run."""
    with (fast_linears(model) if packed else contextlib.nullcontext(False)) as used:
        if packed and not used:
            pytest.skip("oneDNN's packed float32 linear is not usable on this CPU")
        yield


def test_eager_attention_gets_the_additive_mask_and_the_same_tokens(tiny_llama, monkeypatch):
    """sdpa takes the engine's boolean decode mask; eager attention adds its mask, so the engine must hand it the
    additive form: the same tokens as model.generate under eager attention."""
    tok, model = load_tokenizer(tiny_llama), load_model(tiny_llama, torch.device("cpu"), torch.float32)
    monkeypatch.setattr(model.config, "_attn_implementation", "eager", raising=False)
    assert not Engine(model, 2, 8).sdpa
    check_engine_against_generate(tok, model)


@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_qwen"])
def test_bmm_decode_attention_gives_model_generates_tokens_as_the_cache_grows_and_shrinks(arch, request,
                                                                                            monkeypatch):
    """The batched-matmul decode attention (bfloat16 on the CPU) forced in float32, where model.generate at batch 1
    is a reference that does not round: the same tokens, on a cache that grows and shrinks in buckets of 4."""
    path = request.getfixturevalue(arch)
    tok, model = load_tokenizer(path), load_model(path, torch.device("cpu"), torch.float32)
    monkeypatch.setattr("common.engine.batched_attention", lambda dtype, device: "bmm")
    monkeypatch.setattr("common.kvcache.BUCKET", 4)
    monkeypatch.setenv("COTPRUNE_EXACT_ATTENTION", "0")
    lengths, reserve = [], SlotCache.reserve

    def watched(cache, n, shrink=False):
        reserve(cache, n, shrink)
        lengths.append(cache.length)
    monkeypatch.setattr(SlotCache, "reserve", watched)
    check_engine_against_generate(tok, model, attention="batched (bmm)")
    steps = list(zip(lengths, lengths[1:]))
    assert any(b > a for a, b in steps) and any(b < a for a, b in steps)  # it grew and it shrank


def test_slot_cache_keeps_every_slots_keys_through_resizes_and_a_reordering_keep():
    """Growing, shrinking and keep() lay the one buffer out anew each time: every slot must keep its own first
    positions, in keep's order, the positions past them zeroed, the views contiguous."""
    cache = SlotCache(2, 4, 2, 20, 3, torch.float32, torch.device("cpu"), bucket=4)
    cache.reserve(6)
    assert cache.length == 8
    want = [torch.randn(4, 2, 6, 3) for _ in range(4)]
    for t, w in zip(cache.k + cache.v, want):
        t[:, :, :6] = w
    cache.reserve(17)  # grows to 20 (capacity), the positions after 6 still unwritten
    assert cache.length == 20 and all(torch.equal(t[:, :, :6], w) for t, w in zip(cache.k + cache.v, want))
    assert all(not t[:, :, 6:].any() for t in cache.k + cache.v)
    cache.reserve(5, shrink=True)  # 20 -> 8 (the positions past 8 are dropped)
    assert cache.length == 8 and all(torch.equal(t[:, :, :6], w) for t, w in zip(cache.k + cache.v, want))
    cache.reserve(7, shrink=True)  # 8 is within a quarter: no resize
    assert cache.length == 8 and cache.resizes == 3
    cache.keep(torch.tensor([2, 0]))
    assert all(t.shape == (2, 2, 8, 3) and t.is_contiguous() for t in cache.k + cache.v)
    assert all(torch.equal(t[:, :, :6], w[[2, 0]]) for t, w in zip(cache.k + cache.v, want))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_bmm_decode_attention_is_transformers_eager_attention(dtype):
    """_decode_bmm on random queries, a GQA cache and a ragged mask against transformers' eager_attention_forward
    (which repeats the KV heads): the same numbers up to the dtype's rounding of a different matmul shape."""
    from transformers.models.llama.modeling_llama import eager_attention_forward
    from common.attention import _decode_bmm
    g = torch.Generator().manual_seed(0)
    S, H, kvh, L, d = 5, 6, 2, 12, 8
    q, k, v = (torch.randn(*shape, generator=g).to(dtype) for shape in ((S, H, 1, d), (S, kvh, L, d), (S, kvh, L, d)))
    seen = torch.arange(L)[None, :] <= torch.tensor([11, 0, 3, 7, 9])[:, None]
    mask = torch.zeros(S, 1, L, dtype=dtype).masked_fill_(~seen[:, None], torch.finfo(dtype).min)

    class Module(torch.nn.Module):
        num_key_value_groups, training = H // kvh, False
    want, _ = eager_attention_forward(Module(), q, k, v, mask[:, :, None, :], scaling=0.3)
    got, _ = _decode_bmm(Module(), q, k, v, mask, scaling=0.3)
    assert got.shape == want.shape == (S, 1, H, d)
    tol = 1e-6 if dtype == torch.float32 else 2e-2
    assert torch.allclose(got.float(), want.float(), atol=tol, rtol=tol)
    # a slot that sees only position 0 gets exactly that position's values
    assert torch.equal(got[1, 0].view(kvh, H // kvh, d), v[1, :, 0][:, None].expand(kvh, H // kvh, d))


def check_engine_against_generate(tok, model, attention=None):
    prompts = prompts_of(tok, 7)
    free = greedy_no_cache(model, prompts[0], 12)
    eos = free[4]  # a token the model produces: rows that meet it end early, the others run to the cap
    want = [reference(model, p, 12, eos) for p in prompts]
    assert len({len(w) for w in want}) > 1, "the test needs rows of different lengths"
    stats = {}
    got = {k: (ids, why) for k, ids, why, _ in run(model, [(k, p, None) for k, p in enumerate(prompts)], 12,
                                                    {eos}, tok.pad_token_id, 3, stats=stats)}
    assert stats["engine"] == "continuous" and stats["decode_steps"] > 0
    sdpa = model.config._attn_implementation == "sdpa"
    assert stats["decode_attention"] == (attention or (
        "slot by slot" if sdpa and exact_attention(model.dtype) else "batched"))
    for k, w in enumerate(want):
        assert got[k][0] == w, k
        assert got[k][1] == ("eos" if w[-1] == eos else "length")
    assert 1 < stats["mean_busy_slots"] <= 3
    return stats


def test_chunked_prefill_gives_the_same_logits(tiny_llama):
    tok, model = load_tokenizer(tiny_llama), load_model(tiny_llama, torch.device("cpu"), torch.float32)
    ids = prompts_of(tok, 6)[5] * 3
    whole = Engine(model, 1, len(ids) + 1, chunk=512).prefill(0, ids, keep=len(ids))
    chunked = Engine(model, 1, len(ids) + 1, chunk=5).prefill(0, ids, keep=len(ids))
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].float()
    assert torch.allclose(whole, ref, atol=1e-4) and torch.allclose(chunked, ref, atol=1e-4)


def test_a_sampled_row_ignores_its_batch_mates(tiny_llama):
    """Each row draws from its own generator: the same request gives the same tokens alone or among others."""
    tok, model = load_tokenizer(tiny_llama), load_model(tiny_llama, torch.device("cpu"), torch.float32)
    prompts = prompts_of(tok, 5)
    cpu = torch.device("cpu")
    reqs = lambda: [(k, p, row_generator(cpu, 3, f"id{k}")) for k, p in enumerate(prompts)]  # noqa: E731
    together = {k: ids for k, ids, _, _ in run(model, reqs(), 10, set(), tok.pad_token_id, 4, temperature=0.9)}
    alone = {k: ids for k, ids, _, _ in run(model, reqs()[2:3], 10, set(), tok.pad_token_id, 1, temperature=0.9)}
    assert alone[2] == together[2]
    assert len({tuple(v) for v in together.values()}) > 1  # really sampled


def test_stop_function_sees_the_request_key(tiny_llama):
    tok, model = load_tokenizer(tiny_llama), load_model(tiny_llama, torch.device("cpu"), torch.float32)
    prompts = prompts_of(tok, 4)
    seen = set()

    def stop(key, ids):
        seen.add(key)
        return key == 1 and len(ids) == 3
    got = {k: (ids, why) for k, ids, why, _ in run(model, [(k, p, None) for k, p in enumerate(prompts)], 8, set(),
                                                    tok.pad_token_id, 2, stop)}
    assert seen == {0, 1, 2, 3} and got[1][1] == "stop" and len(got[1][0]) == 3
    assert all(got[k][1] == "length" and len(got[k][0]) == 8 for k in (0, 2, 3))


def test_models_the_engine_cannot_drive_take_the_static_path(tiny_llama, monkeypatch):
    tok, model = load_tokenizer(tiny_llama), load_model(tiny_llama, torch.device("cpu"), torch.float32)
    monkeypatch.setattr(model.config, "_attn_implementation", "flash_attention_2", raising=False)
    ok, why = engine_supported(model)
    assert not ok and "flash_attention_2" in why
    monkeypatch.setattr(model.config, "_attn_implementation", "sdpa", raising=False)
    prompts = prompts_of(tok, 3)
    static = decode(model, prompts, 6, {-1}, tok.pad_token_id)
    stats = {}
    monkeypatch.setattr("common.engine.engine_supported", lambda m: (False, "simulated"))
    got = list(run(model, [(k, p, None) for k, p in enumerate(prompts)], 6, {-1}, tok.pad_token_id, 3,
                   stats=stats))
    assert stats["engine"] == "static" and [g[1] for g in got] == [ids for ids, _ in static]


def test_cotprune_engine_static_forces_the_static_path_and_a_bad_value_is_refused(tiny_llama, monkeypatch):
    """COTPRUNE_ENGINE=static (the before/after timing of make all) sends a model the engine could drive through
    static batches, with decode()'s tokens; `continuous` or unset keeps the engine; anything else is one error."""
    from common.cli import CotpruneError
    tok, model = load_tokenizer(tiny_llama), load_model(tiny_llama, torch.device("cpu"), torch.float32)
    prompts = prompts_of(tok, 5)
    requests = [(k, p, None) for k, p in enumerate(prompts)]
    static = decode(model, prompts[:2], 6, {-1}, tok.pad_token_id) + decode(model, prompts[2:4], 6, {-1},
                                                                            tok.pad_token_id)
    for value, engine in (("static", "static"), ("continuous", "continuous"), ("", "continuous")):
        monkeypatch.setenv("COTPRUNE_ENGINE", value)
        stats = {}
        got = list(run(model, requests[:4], 6, {-1}, tok.pad_token_id, 2, stats=stats))
        assert stats["engine"] == engine
        if engine == "static":
            assert stats["engine_reason"] == "COTPRUNE_ENGINE=static"
            assert [g[1] for g in got] == [ids for ids, _ in static]
    monkeypatch.setenv("COTPRUNE_ENGINE", "fast")
    with pytest.raises(CotpruneError, match="COTPRUNE_ENGINE must be continuous or static"):
        next(run(model, requests, 6, {-1}, tok.pad_token_id, 2))


@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_qwen"])
def test_packed_prefill_equals_prompts_prefilled_alone(arch, request):
    """Several prompts prefilled in one packed pass give each slot the same keys, values and last-position logits,
    bit for bit, as prefilling each alone (float32 on the packed linears, which are batch-invariant), and the
    model's attention setting is restored afterwards."""
    path = request.getfixturevalue(arch)
    tok, model = load_tokenizer(path), load_model(path, torch.device("cpu"), torch.float32)
    prompts = prompts_of(tok, 5)
    with fast_linears(model) as used, torch.inference_mode():
        if not used:
            pytest.skip("oneDNN's packed float32 linear is not usable on this CPU")
        alone, packed = Engine(model, 5, 64), Engine(model, 5, 64)
        want = torch.cat([alone.prefill(s, p) for s, p in enumerate(prompts)])
        got = packed.prefill_packed([(s, p, 0) for s, p in enumerate(prompts)])
    assert model.config._attn_implementation == "sdpa"
    assert torch.equal(got, want)
    for k_alone, k_packed in zip(alone.cache.k + alone.cache.v, packed.cache.k + packed.cache.v):
        for s, p in enumerate(prompts):
            assert torch.equal(k_packed[s, :, : len(p)], k_alone[s, :, : len(p)])


@pytest.mark.parametrize("packed", [False, True], ids=["alone", "packed"])
def test_rows_that_share_a_prefix_prefill_it_once_and_ignore_their_batch(tiny_llama, packed):
    """Rows given a shared prefix (as one problem's interventions are) copy the positions their prompts share with
    it and prefill only the rest (alone, or packed on the row-invariant linears): the tokens of prefilling each
    prompt whole, the copied count as computed by hand, and, in float32, the same tokens whatever the slots and
    the order of the queue."""
    tok, model = load_tokenizer(tiny_llama), load_model(tiny_llama, torch.device("cpu"), torch.float32)
    with linears(model, packed):
        check_shared_prefix(tok, model)


def check_shared_prefix(tok, model):
    from common.engine import MIN_SHARED
    base = [t for p in prompts_of(tok, 6) for t in p][:40]
    assert len(base) == 40 > MIN_SHARED
    x, y = [t for t in range(3, 200) if t not in base][:2]  # tokens the prefix lacks: prompts part from it there
    rows = {"part": base[:20] + [x, y], "most": base[:33] + [y], "all": base + [x, y], "same": base,
            "short": base[:5] + [y],  # shares 5 < MIN_SHARED tokens: prefilled whole
            "other": prompts_of(tok, 3)[2]}  # no prefix at all
    common = {"part": 20, "most": 33, "all": 40, "same": 39}  # "same" computes its last position, for its logits
    assert all(rows[k][common[k]] != base[common[k]] for k in ("part", "most"))

    def gen(slots, order, share=True):
        stats = {}
        reqs = [(k, rows[k], None) + ((base,) if share and k != "other" else ()) for k in order]
        got = {k: ids for k, ids, _, _ in run(model, reqs, 8, set(), tok.pad_token_id, slots, stats=stats)}
        return got, stats
    whole, st0 = gen(6, list(rows), share=False)
    shared, st = gen(6, list(rows))
    assert st0["shared_prefix_tokens"] == 0 and st["shared_prefix_tokens"] == sum(common.values())
    assert shared == whole
    for slots, order in ((1, list(rows)), (2, list(reversed(rows))), (4, ["short", "all", "other", "same", "part",
                                                                          "most"])):
        again, _ = gen(slots, order)
        assert again == shared, (slots, order)  # the same bits: each row's keys depend on its prefix and prompt only


def test_packed_rests_after_a_past_equal_each_prefilled_alone(tiny_llama):
    """Prompts whose first positions are already in their slots, prefilled packed from there, give the keys and
    logits of prefilling each alone from there, bit for bit (float32, packed linears)."""
    tok, model = load_tokenizer(tiny_llama), load_model(tiny_llama, torch.device("cpu"), torch.float32)
    base = [t for p in prompts_of(tok, 6) for t in p][:30]
    prompts = [base[:12] + p for p in prompts_of(tok, 4)]
    with fast_linears(model) as used, torch.inference_mode():
        if not used:
            pytest.skip("oneDNN's packed float32 linear is not usable on this CPU")
        alone, packed = Engine(model, 4, 64), Engine(model, 4, 64)
        for eng in (alone, packed):
            for s in range(4):
                eng.prefill(s, base[:12])
        want = torch.cat([alone.prefill(s, p, start=12) for s, p in enumerate(prompts)])
        got = packed.prefill_packed([(s, p, 12) for s, p in enumerate(prompts)])
    assert torch.equal(got, want)
    for k_alone, k_packed in zip(alone.cache.k + alone.cache.v, packed.cache.k + packed.cache.v):
        assert all(torch.equal(k_packed[s, :, : len(p)], k_alone[s, :, : len(p)]) for s, p in enumerate(prompts))


def test_a_prefix_only_one_row_has_is_not_prefilled_apart(tiny_llama, monkeypatch):
    tok, model = load_tokenizer(tiny_llama), load_model(tiny_llama, torch.device("cpu"), torch.float32)
    base = [t for p in prompts_of(tok, 6) for t in p][:40]
    stats = {}
    list(run(model, [("a", base[:30], None, base), ("b", prompts_of(tok, 2)[1], None, None)], 3, set(),
             tok.pad_token_id, 2, stats=stats))
    assert stats["shared_prefix_tokens"] == 0 and stats["prefilled_rows"] == 2


def test_float32_prompts_are_not_packed_on_linears_that_are_not_row_invariant(tiny_llama, monkeypatch):
    """Without the packed (row-invariant) linears a float32 engine prefills each prompt alone; on them (where the
    probe lets fast_linears pack) it packs them."""
    tok, model = load_tokenizer(tiny_llama), load_model(tiny_llama, torch.device("cpu"), torch.float32)
    calls, packed_prefill = [], Engine.prefill_packed
    monkeypatch.setattr(Engine, "prefill_packed", lambda self, items: calls.append(1) or packed_prefill(self, items))
    requests = [(k, p, None) for k, p in enumerate(prompts_of(tok, 4))]
    list(run(model, requests, 3, set(), tok.pad_token_id, 4))
    assert calls == []
    with fast_linears(model) as used:
        list(run(model, requests, 3, set(), tok.pad_token_id, 4))
    assert bool(calls) == used


def test_exact_attention_is_on_in_float32_off_in_bfloat16_and_can_be_forced(tiny_llama, monkeypatch):
    from common.cli import CotpruneError
    monkeypatch.delenv("COTPRUNE_EXACT_ATTENTION", raising=False)
    f32 = load_model(tiny_llama, torch.device("cpu"), torch.float32)
    bf16 = load_model(tiny_llama, torch.device("cpu"), torch.bfloat16)
    assert Engine(f32, 2, 8).exact_attention and not Engine(bf16, 2, 8).exact_attention
    monkeypatch.setenv("COTPRUNE_EXACT_ATTENTION", "0")
    assert not Engine(f32, 2, 8).exact_attention
    monkeypatch.setenv("COTPRUNE_EXACT_ATTENTION", "1")
    assert Engine(bf16, 2, 8).exact_attention
    monkeypatch.setattr(f32.config, "_attn_implementation", "eager", raising=False)
    assert not Engine(f32, 2, 8).exact_attention  # slot by slot is an sdpa wrapper; eager reads its mask
    monkeypatch.setenv("COTPRUNE_EXACT_ATTENTION", "yes")
    with pytest.raises(CotpruneError, match="COTPRUNE_EXACT_ATTENTION must be 0 or 1"):
        Engine(bf16, 2, 8)


@pytest.mark.parametrize("direct", [True, False], ids=["direct-sdpa", "through-transformers"])
@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_qwen"])
def test_exact_decode_logits_equal_model_generate_at_batch_1_bit_for_bit(arch, direct, request, monkeypatch):
    """Five prompts of different lengths decoded together in five slots (so every step reads the longest row's
    positions): with exact attention each slot's logits at every step equal model.generate's for that prompt alone,
    bit for bit, on the packed linears both sides use."""
    import common.attention as attention
    monkeypatch.delenv("COTPRUNE_EXACT_ATTENTION", raising=False)
    calls = []  # the direct sdpa calls must be what ran (or, forced off, the fallback through transformers' wrapper)
    monkeypatch.setattr(attention, "_exact_decode", lambda *a: calls.append(1) or _exact_decode(*a))
    if not direct:
        monkeypatch.setattr(attention, "_direct_sdpa_ok", lambda *a: False)
    path = request.getfixturevalue(arch)
    tok, model = load_tokenizer(path), load_model(path, torch.device("cpu"), torch.float32)
    prompts, steps = prompts_of(tok, 5), 10
    with torch.inference_mode(), fast_linears(model) as packed:
        if not packed:
            pytest.skip("oneDNN's packed float32 linear is not usable on this CPU")
        want = []
        for p in prompts:
            out = model.generate(torch.tensor([p]), max_new_tokens=steps, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True, eos_token_id=None, pad_token_id=tok.pad_token_id)
            want.append(torch.stack([lg[0] for lg in out.logits]).float())
        eng = Engine(model, len(prompts), max(map(len, prompts)) + steps + 1)
        assert eng.exact_attention
        got = [[lg] for lg in eng.prefill_packed([(s, p, 0) for s, p in enumerate(prompts)])]
        pos = torch.tensor([len(p) for p in prompts])
        for _ in range(steps - 1):
            tokens = torch.stack([g[-1].argmax() for g in got])
            logits = eng._step(tokens, pos, int(pos.max()) + 1)
            pos += 1
            for g, lg in zip(got, logits):
                g.append(lg)
    assert len(calls) == (steps - 1) * model.config.num_hidden_layers * direct
    for k, (g, w) in enumerate(zip(got, want)):
        assert torch.equal(torch.stack(g), w), k
