"""prefopt_fast.integrations.hf: hidden states + lm_head of HF causal LMs (plain / PEFT) against the logits path."""

import contextlib
import socket
import sys
import types

import expected  # noqa: I001  (tests/expected.py: fails in strict mode where a peer is missing)
import pytest
import torch
from torch import nn

transformers = expected.require_module("transformers")

from prefopt_fast import reference as R  # noqa: E402
from prefopt_fast.integrations import hf  # noqa: E402

V = 80


def llama(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=V,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        **kw,
    )
    return transformers.LlamaForCausalLM(cfg)


def batch(B=3, T=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, T), generator=g)
    am = torch.ones_like(ids)
    am[0, -2:] = 0  # right padding
    completion = torch.zeros_like(ids)
    completion[:, 3:] = 1
    completion &= am
    return ids, am, completion


def naive_sequence_logprobs(model, ids, am, completion, temperature=1.0):
    """prefopt_fast.reference's per-sequence sums, computed in fp32 on the model's logits."""
    logits = model(input_ids=ids, attention_mask=am).logits
    labels = hf.shift_labels(ids, completion)
    return R.sequence_logprobs(logits, labels, temperature=temperature, dtype=torch.float32)


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def check_against_naive(model, temperature=1.0, rtol=1e-5):
    ids, am, completion = batch()
    model.zero_grad()
    a = naive_sequence_logprobs(model, ids, am, completion, temperature)
    a.sum().backward()
    ga = grads(model)
    model.zero_grad()
    b = hf.sequence_logprobs(model, ids, completion, attention_mask=am, temperature=temperature)
    b.sum().backward()
    gb = grads(model)
    torch.testing.assert_close(b, a, rtol=rtol, atol=1e-5)
    assert ga.keys() == gb.keys() and ga
    for n in ga:
        torch.testing.assert_close(gb[n], ga[n], rtol=1e-4, atol=1e-6, msg=n)
    return ga


def test_shift_labels():
    ids = torch.tensor([[5, 6, 7, 8]])
    mask = torch.tensor([[0, 0, 1, 1]])
    assert hf.shift_labels(ids).tolist() == [[6, 7, 8, -100]]
    assert hf.shift_labels(ids, mask).tolist() == [[-100, 7, 8, -100]]
    with pytest.raises(ValueError, match="loss_mask"):
        hf.shift_labels(ids, mask[:, :3])


def test_plain_llama_matches_logits_path():
    model = llama()
    head = hf.get_lm_head(model)
    assert head.weight is model.lm_head.weight and head.bias is None and head.lora is None
    assert head.logit_scale == 1.0 and head.softcap is None
    assert hf.get_backbone(model) is model.model
    check_against_naive(model, temperature=0.8)


def test_hidden_states_are_the_backbone_output_and_no_logits_are_built(monkeypatch):
    model = llama()
    ids, am, _ = batch()
    called = []
    monkeypatch.setattr(model.lm_head, "forward", lambda *a, **k: called.append(1))
    hidden, head = hf.hidden_and_head(model, ids, am)
    assert not called and hidden.shape == (3, 8, 32)
    torch.testing.assert_close(hidden, model.model(input_ids=ids, attention_mask=am).last_hidden_state)


@pytest.mark.parametrize("arch", ["gemma2_softcap", "granite_scaling", "cohere_scale"])
def test_config_logit_transforms(arch):
    common = dict(
        vocab_size=V,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    if arch == "gemma2_softcap":
        model = transformers.Gemma2ForCausalLM(
            transformers.Gemma2Config(head_dim=16, final_logit_softcapping=2.0, **common)
        )
        want = (1.0, 2.0)
    elif arch == "granite_scaling":
        model = transformers.GraniteForCausalLM(transformers.GraniteConfig(logits_scaling=4.0, **common))
        want = (0.25, None)
    else:
        model = transformers.CohereForCausalLM(transformers.CohereConfig(logit_scale=0.5, **common))
        want = (0.5, None)
    head = hf.get_lm_head(model)
    assert (head.logit_scale, head.softcap) == want
    check_against_naive(model)


def _peft():
    return expected.require_module("peft")


def test_peft_lora_in_backbone_and_on_head():
    peft = _peft()
    model = peft.get_peft_model(
        llama(),
        peft.LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"], lora_dropout=0.0, init_lora_weights=False
        ),
    )
    head = hf.get_lm_head(model)
    a, b, s = head.lora
    layer = model.base_model.model.lm_head
    assert a is layer.lora_A["default"].weight and b is layer.lora_B["default"].weight and s == 2.0
    assert head.weight is layer.base_layer.weight
    g = check_against_naive(model)
    assert any("lm_head.lora_A" in n for n in g) and any("q_proj.lora_B" in n for n in g)


def test_peft_reference_is_the_base_model():
    peft = _peft()
    base = llama()
    model = peft.get_peft_model(
        base,
        peft.LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "lm_head"], lora_dropout=0.0, init_lora_weights=False
        ),
    )
    ids, am, completion = batch()
    with torch.no_grad(), model.disable_adapter():
        want = naive_sequence_logprobs(model, ids, am, completion)
    got = hf.reference_sequence_logprobs(model, ids, completion, attention_mask=am)
    assert not got.requires_grad
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with hf.adapters_disabled(model):
        assert hf.get_lm_head(model).lora is None
    assert hf.get_lm_head(model).lora is not None
    other = llama(seed=3)
    with torch.no_grad():
        want_other = naive_sequence_logprobs(other, ids, am, completion)
    got_other = hf.reference_sequence_logprobs(model, ids, completion, ref_model=other, attention_mask=am)
    torch.testing.assert_close(got_other, want_other, rtol=1e-5, atol=1e-5)
    with pytest.raises(TypeError, match="PeftModel"):
        hf.reference_sequence_logprobs(other, ids, completion)


def test_peft_modules_to_save_head():
    peft = _peft()
    model = peft.get_peft_model(llama(), peft.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    wrapper = model.base_model.model.lm_head
    with torch.no_grad():
        wrapper.modules_to_save["default"].weight.add_(0.5)
    assert hf.get_lm_head(model).weight is wrapper.modules_to_save["default"].weight
    g = check_against_naive(model)
    assert any("modules_to_save" in n for n in g)
    with model.disable_adapter():
        assert hf.get_lm_head(model).weight is wrapper.original_module.weight


def test_bf16_model_with_fp32_adapters_is_cast_to_one_dtype():
    peft = _peft()
    model = peft.get_peft_model(
        llama().to(torch.bfloat16), peft.LoraConfig(r=4, target_modules=["lm_head"], init_lora_weights=False)
    )
    assert model.base_model.model.lm_head.lora_A["default"].weight.dtype == torch.float32  # PEFT's autocast
    ids, am, completion = batch()
    hidden, head = hf.hidden_and_head(model, ids, am)
    assert hidden.dtype == torch.bfloat16 and head.dtypes == {torch.bfloat16}
    out = hf.sequence_logprobs(model, ids, completion, attention_mask=am)
    out.sum().backward()
    a = model.base_model.model.lm_head.lora_A["default"].weight
    assert a.grad is not None and a.grad.dtype == torch.float32
    with torch.no_grad():
        ref = naive_sequence_logprobs(model.float(), ids, am, completion)
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=0.3)


def test_unsupported_heads_are_refused():
    peft = _peft()
    drop = peft.get_peft_model(llama(), peft.LoraConfig(r=4, target_modules=["lm_head"], lora_dropout=0.1))
    drop.train()
    with pytest.raises(ValueError, match="lora_dropout"):
        hf.get_lm_head(drop)
    drop.eval()
    assert hf.get_lm_head(drop).lora is not None
    dora = peft.get_peft_model(llama(), peft.LoraConfig(r=4, target_modules=["lm_head"], use_dora=True))
    with pytest.raises(TypeError, match="DoRA"):
        hf.get_lm_head(dora)
    prefix = peft.get_peft_model(llama(), peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    with pytest.raises(TypeError, match="prompt-learning"):
        hf.get_hidden_states(prefix, torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="DataParallel"):
        hf.get_lm_head(nn.DataParallel(llama()))
    odd = llama()
    odd.lm_head = nn.Sequential(nn.Linear(32, V))
    with pytest.raises(TypeError, match="not an nn.Linear"):
        hf.get_lm_head(odd)


def test_linear_dpo_loss_from_the_helper_matches_logits_dpo():
    import prefopt_fast as pf
    from prefopt_fast.linear import linear_dpo_loss

    model = llama()
    ids, am, completion = batch(B=4)
    hidden, head = hf.hidden_and_head(model, ids, am)
    labels = hf.shift_labels(ids, completion)
    ref = torch.randn(4)
    loss, m = linear_dpo_loss(
        hidden, head.weight, labels, **head.kwargs(), ref_chosen_logps=ref[:2], ref_rejected_logps=ref[2:], beta=0.1
    )
    logits = model(input_ids=ids, attention_mask=am).logits
    loss2, m2 = pf.logits_dpo_loss(logits, labels, ref_chosen_logps=ref[:2], ref_rejected_logps=ref[2:], beta=0.1)
    torch.testing.assert_close(loss, loss2, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- sharded heads


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def one_rank_group():
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_dtensor_head_is_gathered_and_gradients_reach_the_shard():
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    from prefopt_fast.linear import linear_token_logprobs

    g = torch.Generator().manual_seed(0)
    w = torch.randn(V, 16, generator=g) * 0.3
    b = torch.randn(V, generator=g) * 0.1
    h = torch.randn(2, 5, 16, generator=g)
    y = torch.randint(0, V, (2, 5), generator=g)
    with one_rank_group():
        mesh = init_device_mesh("cpu", (1,))
        wd = nn.Parameter(distribute_tensor(w.clone(), mesh, [Shard(0)]))
        bd = nn.Parameter(distribute_tensor(b.clone(), mesh, [Shard(0)]))
        with hf.gathered_lm_head(hf.LMHead(wd, bd)) as full:
            assert not isinstance(full.weight, DTensor) and not isinstance(full.bias, DTensor)
            out = linear_token_logprobs(h, full.weight, y, **full.kwargs())
            out.sum().backward()
        assert isinstance(wd.grad, DTensor)
        wd_grad, bd_grad = wd.grad.full_tensor(), bd.grad.full_tensor()
    wp, bp = w.clone().requires_grad_(True), b.clone().requires_grad_(True)
    ref = R.linear_token_stats(h, wp, y, bias=bp, dtype=None)["logprobs"]
    ref.sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(wd_grad, wp.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(bd_grad, bp.grad, rtol=1e-4, atol=1e-6)


def test_plain_head_passes_through_gather_unchanged():
    head = hf.get_lm_head(llama())
    with hf.gathered_lm_head(head) as full:
        assert full.weight is head.weight


def test_zero3_head_is_gathered_with_deepspeed(monkeypatch):
    """The ZeRO-3 branch against a stand-in deepspeed module (deepspeed itself is not installed here)."""
    events = []

    class Status:
        AVAILABLE = "available"
        NOT_AVAILABLE = "not_available"

    class GatheredParameters:
        def __init__(self, params, modifier_rank=None):
            self.params = params
            events.append(("init", [p.ds_id for p in params], modifier_rank))

        def __enter__(self):
            events.append(("enter",))

        def __exit__(self, *exc):
            events.append(("exit",))

    ds = types.ModuleType("deepspeed")
    ds.zero = types.SimpleNamespace(GatheredParameters=GatheredParameters)
    pp = types.ModuleType("deepspeed.runtime.zero.partition_parameters")
    pp.ZeroParamStatus = Status
    for name, mod in {
        "deepspeed": ds,
        "deepspeed.runtime": types.ModuleType("deepspeed.runtime"),
        "deepspeed.runtime.zero": types.ModuleType("deepspeed.runtime.zero"),
        "deepspeed.runtime.zero.partition_parameters": pp,
    }.items():
        monkeypatch.setitem(sys.modules, name, mod)
    w = nn.Parameter(torch.randn(V, 8))
    b = nn.Parameter(torch.randn(V))
    w.ds_id, w.ds_status = 1, Status.NOT_AVAILABLE
    b.ds_id, b.ds_status = 2, Status.AVAILABLE  # already gathered (e.g. tied): not gathered again
    # no gradient can reach the head (a reference): gathered for the block (with one, see test_zero3.py)
    with torch.no_grad(), hf.gathered_lm_head(hf.LMHead(w, b)) as full:
        assert events == [("init", [1], None), ("enter",)]
        assert full.weight is w and full.bias is b
    assert events[-1] == ("exit",)
