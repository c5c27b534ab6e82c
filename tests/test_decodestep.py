"""common/decodestep.py: the written-out decode step against the model's own decoder modules, bit for bit."""
import contextlib

import pytest
import torch

from common.decodestep import Stepper, stepper_supported
from common.engine import Engine, fast_linears
from common.models import load_model, load_tokenizer
from test_engine import check_engine_against_generate, prompts_of


def step_logits(model, prompts, steps, written_out, exact=None):
    """The prefill's and then every decode step's logits [1 + steps, slots, V] of an engine with one slot per prompt,
    through the written-out step or the model's modules. The tokens fed are drawn at random from a fixed seed, so
    both sides read the same tokens whatever they compute."""
    eng = Engine(model, len(prompts), max(map(len, prompts)) + steps + 1)
    if exact is not None:
        eng.exact_attention, eng.bmm_attention = exact, False
    assert (eng.stepper is not None) == stepper_supported(model)[0]
    if not written_out:
        eng.stepper = None
    out = [torch.stack([lg for lg in eng.prefill_packed([(s, p, 0) for s, p in enumerate(prompts)])])]
    pos = torch.tensor([len(p) for p in prompts])
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        tokens = torch.randint(0, model.config.vocab_size, (len(prompts),), generator=g)
        out.append(eng._step(tokens, pos, int(pos.max()) + 1))
        pos += 1
    return torch.stack(out), eng


@pytest.mark.parametrize("attention", ["default", "batched-sdpa"])
@pytest.mark.parametrize("packed", [False, True], ids=["default-linears", "packed-linears"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_qwen"])
def test_written_out_step_gives_the_modules_bits(arch, dtype, packed, attention, request):
    """Five prompts of different lengths, ten steps: the written-out step's logits equal the model's own decoder
    modules' bit for bit, in either dtype, on either linears, with each decode attention the engine can choose
    (float32: slot by slot, bfloat16: the batched matmuls; both: batched sdpa)."""
    path = request.getfixturevalue(arch)
    tok, model = load_tokenizer(path), load_model(path, torch.device("cpu"), dtype)
    prompts = prompts_of(tok, 5)
    exact = False if attention == "batched-sdpa" else None
    with torch.inference_mode(), (fast_linears(model) if packed else contextlib.nullcontext(False)) as used:
        if packed and not used:
            pytest.skip("oneDNN's packed linear is not usable on this CPU in this dtype")
        want, _ = step_logits(model, prompts, 10, False, exact)
        got, eng = step_logits(model, prompts, 10, True, exact)
    assert eng.stepper.ok, "the step never ran its projections"
    assert torch.equal(got, want)


def test_projections_that_would_change_bits_are_not_stacked(tiny_llama, monkeypatch):
    """Where the probe finds the stacked matmul's bits differ, the step calls the modules one by one: still equal."""
    model = load_model(tiny_llama, torch.device("cpu"), torch.float32)
    tok = load_tokenizer(tiny_llama)
    monkeypatch.setattr(Stepper, "_stacked_ok", lambda self, linear, x: False)
    with torch.inference_mode():
        want, _ = step_logits(model, prompts_of(tok, 3), 4, False)
        got, eng = step_logits(model, prompts_of(tok, 3), 4, True)
    assert set(eng.stepper.ok.values()) == {False} and torch.equal(got, want)


def test_the_stacking_probe_sees_a_changed_bit(tiny_llama, monkeypatch):
    """The probe compares the stacked matmul with the modules: a stacked weight one ulp off must fail it."""
    model = load_model(tiny_llama, torch.device("cpu"), torch.float32)
    stepper = Stepper(model)
    x = torch.zeros(4, 1, model.config.hidden_size)
    assert stepper._stacked_ok(None, x)
    stacked = Stepper._stacked_weight

    def one_ulp_off(mods, pack):  # the gate/up stack with the up projection's last row, first input, one ulp up
        W = stacked(mods, pack)
        if len(mods) == 2:
            W[-1, 0] = torch.nextafter(W[-1, 0], W[-1, 0] + 1)
        return W
    monkeypatch.setattr(Stepper, "_stacked_weight", staticmethod(one_ulp_off))
    assert not stepper._stacked_ok(None, x)


def test_layers_it_does_not_know_or_that_carry_hooks_keep_the_modules(tiny_llama, monkeypatch):
    """A hook on a layer (an adapter, an offloading hook) or a layer class it does not write out: the engine decodes
    through the model's modules, with model.generate's tokens."""
    import common.decodestep as decodestep
    tok, model = load_tokenizer(tiny_llama), load_model(tiny_llama, torch.device("cpu"), torch.float32)
    assert stepper_supported(model) == (True, "")
    handle = model.model.layers[1].mlp.register_forward_hook(lambda mod, inp, out: None)
    ok, why = stepper_supported(model)
    assert not ok and "hooks" in why
    assert Engine(model, 2, 16).stepper is None
    assert check_engine_against_generate(tok, model)["decode_step"] == "the model's modules"
    handle.remove()
    monkeypatch.setattr(decodestep, "LAYERS", ("Qwen2DecoderLayer",))
    ok, why = stepper_supported(model)
    assert not ok and "LlamaDecoderLayer" in why
    monkeypatch.undo()
    assert check_engine_against_generate(tok, model)["decode_step"] == "written out"
