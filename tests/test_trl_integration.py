"""prefopt_fast.integrations.trl against TRL 1.16 as shipped, on CPU with tiny random models.

Each trainer case runs twice from the same seed -- once with TRL's own trainer, once with
prefopt_fast's (the subclass, which also patches TRL's fused LM head; or only the patch) --
and compares every logged value (losses, gradient norms, metrics) and the trainable
parameters after every optimizer step. fp32, plain SGD (Adam's first step, lr * sign(g),
would turn rounding-level gradient differences of near-zero entries into lr-sized ones).
"""

import copy
import os
import random
import subprocess
import sys
import threading
import types
import warnings
from collections import defaultdict

import expected  # noqa: I001  (tests/expected.py: fails in strict mode where a peer is missing)
import pytest
import torch

trl = expected.require_module("trl")
transformers = expected.require_module("transformers")
datasets = expected.require_module("datasets")

import trl.trainer.utils as trl_utils  # noqa: E402
from trl.kernels import ChunkedLogProbFunction  # noqa: E402

from prefopt_fast.integrations import trl as ptrl  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
RTOL, ATOL = 1e-5, 1e-6
V = 96
_SKIP_LOG = ("runtime", "per_second", "time")
_MISSING = object()


# --------------------------------------------------------------------------- tiny world


@pytest.fixture(scope="module")
def tok():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{f"w{i}": i + 3 for i in range(V - 3)}}
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=t, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def _words(r, lo, hi):
    return " ".join(f"w{r.randrange(V - 3)}" for _ in range(r.randint(lo, hi)))


def preference_dataset(n=4, seed=0):
    """A fresh in-memory dataset each call (a new fingerprint: no reuse of precomputed reference caches)."""
    r = random.Random(seed)
    rows = [
        dict(prompt=_words(r, 1, 4), chosen=" " + _words(r, 1, 4), rejected=" " + _words(r, 1, 4)) for _ in range(n)
    ]
    return datasets.Dataset.from_list(rows)


def llama_config(**kw):
    return transformers.LlamaConfig(
        vocab_size=V,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=1,
        **kw,
    )


def tiny_lm(seed=0):
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(llama_config())


def common_args(**kw):
    base = dict(
        output_dir="/tmp/prefopt_fast_trl_tests",
        per_device_train_batch_size=2,
        max_steps=2,
        logging_steps=1,
        report_to=[],
        bf16=False,
        gradient_checkpointing=False,
        learning_rate=0.05,
        optim="sgd",
        lr_scheduler_type="constant",
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        dataloader_num_workers=0,
    )
    base.update(kw)
    return base


class _Snapshots(transformers.TrainerCallback):
    def __init__(self):
        self.steps = []

    def on_step_end(self, args, state, control, model=None, **kw):
        self.steps.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})


def _train(trainer_cls, **kw):
    snaps = _Snapshots()
    tr = trainer_cls(callbacks=[snaps], **kw)
    tr.train()
    return tr, tr.state.log_history, snaps.steps


def _compare_runs(ref, ours):
    (_, logs_a, steps_a), (_, logs_b, steps_b) = ref, ours
    assert len(logs_a) == len(logs_b) and len(steps_a) == len(steps_b) >= 2
    for i, (a, b) in enumerate(zip(logs_a, logs_b)):
        assert set(a) == set(b), f"step {i}: logged keys differ: {set(a) ^ set(b)}"
        for k, va in a.items():
            if any(s in k for s in _SKIP_LOG) or not isinstance(va, (int, float)):
                continue
            torch.testing.assert_close(float(b[k]), float(va), rtol=RTOL, atol=ATOL, msg=f"log {i} {k!r}")
    for i, (pa, pb) in enumerate(zip(steps_a, steps_b)):
        assert pa.keys() == pb.keys()
        for n in pa:
            torch.testing.assert_close(pb[n], pa[n], rtol=RTOL, atol=1e-7, msg=f"step {i} parameter {n}")


def _moved(run):
    """The parameters changed during the run (the comparison would be vacuous otherwise)."""
    steps = run[2]
    return any(not torch.equal(steps[0][n], steps[-1][n]) for n in steps[0])


# --------------------------------------------------------------------------- import hygiene


def test_importing_prefopt_fast_does_not_import_trl():
    code = (
        "import sys, prefopt_fast, prefopt_fast.linear, prefopt_fast.integrations, prefopt_fast.integrations.hf; "
        "bad = [m for m in ('trl', 'transformers', 'peft') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# --------------------------------------------------------------------------- patch / unpatch


def _original():
    return trl_utils._ChunkedLogProbFunction


def test_patch_unpatch_restores_exactly():
    before = trl_utils._ChunkedLogProbFunction
    assert before is ChunkedLogProbFunction and not ptrl.is_trl_patched()
    ptrl.patch_trl()
    ptrl.patch_trl()  # idempotent
    try:
        assert trl_utils._ChunkedLogProbFunction is ptrl.PrefoptChunkedLogProbFunction
        with ptrl.patched_trl():  # nested context keeps the manual patch
            assert ptrl.is_trl_patched()
        assert ptrl.is_trl_patched()
    finally:
        ptrl.unpatch_trl()
    ptrl.unpatch_trl()  # idempotent
    assert trl_utils._ChunkedLogProbFunction is before
    with ptrl.patched_trl():
        with ptrl.patched_trl():
            assert ptrl.is_trl_patched()
        assert ptrl.is_trl_patched()
        ptrl.unpatch_trl()  # a manual unpatch inside a context: the context still holds it
        assert ptrl.is_trl_patched()
    assert trl_utils._ChunkedLogProbFunction is before


def test_patch_restores_a_foreign_object_and_keeps_later_replacements():
    sentinel = types.SimpleNamespace(apply=None)
    trl_utils._ChunkedLogProbFunction = sentinel
    try:
        with ptrl.patched_trl():
            assert ptrl.is_trl_patched()
        assert trl_utils._ChunkedLogProbFunction is sentinel
        other = types.SimpleNamespace(apply=None)
        with pytest.warns(RuntimeWarning, match="replaced by something else"):
            with ptrl.patched_trl():
                trl_utils._ChunkedLogProbFunction = other
        assert trl_utils._ChunkedLogProbFunction is other
    finally:
        trl_utils._ChunkedLogProbFunction = ChunkedLogProbFunction


def test_patched_context_is_thread_safe():
    errors = []
    barrier = threading.Barrier(4)

    def worker():
        try:
            barrier.wait()
            for _ in range(200):
                with ptrl.patched_trl():
                    assert ptrl.is_trl_patched()
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert trl_utils._ChunkedLogProbFunction is ChunkedLogProbFunction


KERNEL_CASES = {
    "plain_all_outputs": dict(),
    "bias_softcap_scale_temp": dict(bias=True, softcap=5.0, scale=0.75, temperature=0.7),
    "softcap_zero_is_one": dict(softcap=0.0, scale=2.0),
    "logprobs_only": dict(outputs=("log_probs",)),
    "entropy_only_no_grad_logp": dict(outputs=("entropy",), w_logp=0.0),
    "top1_ties": dict(ties=True, outputs=("is_top1", "mean_logits")),
}


@pytest.mark.parametrize("name", list(KERNEL_CASES))
def test_patched_kernel_matches_trl(name):
    case = KERNEL_CASES[name]
    N, H = 37, 12
    outputs = case.get("outputs", ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1"))
    results = []
    for fn in (ChunkedLogProbFunction, ptrl.PrefoptChunkedLogProbFunction):
        g = torch.Generator().manual_seed(3)
        h = torch.randn(N, H, generator=g)
        w = torch.randn(V * 3, H, generator=g) * 0.4
        if case.get("ties"):
            h[:5] = 0.0  # every logit equal: the label is top-1 only at index 0
        h.requires_grad_(True)
        w.requires_grad_(True)
        b = (torch.randn(V * 3, generator=g) * 0.1).requires_grad_(True) if case.get("bias") else None
        y = torch.randint(0, V * 3, (N,), generator=g)
        y[:3] = 0
        out = fn.apply(
            h, w, b, y, case.get("temperature", 1.0), 64, case.get("softcap"), case.get("scale", 1.0), outputs
        )
        loss = case.get("w_logp", 0.3) * out[0].sum()
        if out[1] is not None:
            loss = loss + 0.2 * out[1].sum()
        if loss.requires_grad:
            loss.backward()
        results.append((out, [t.grad for t in (h, w, b) if t is not None]))
    (oa, ga), (ob, gb) = results
    for i, (x, z) in enumerate(zip(oa, ob)):
        assert (x is None) == (z is None), i
        if x is None:
            continue
        assert x.dtype == z.dtype and x.shape == z.shape and x.requires_grad == z.requires_grad, i
        if x.dtype == torch.bool:
            assert torch.equal(x, z), i
        else:
            torch.testing.assert_close(z, x, rtol=RTOL, atol=1e-5)
    for x, z in zip(ga, gb):
        assert (x is None) == (z is None)
        if x is not None:
            torch.testing.assert_close(z, x, rtol=1e-4, atol=1e-6)


def test_patched_kernel_under_bf16_autocast_follows_trl_dtype_rules():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(20, 16, generator=g).requires_grad_(True)
    w = (torch.randn(200, 16, generator=g) * 0.3).requires_grad_(True)
    y = torch.randint(0, 200, (20,), generator=g)
    got = []
    for fn in (ChunkedLogProbFunction, ptrl.PrefoptChunkedLogProbFunction):
        h.grad = w.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            lp, ent, *_ = fn.apply(h, w, None, y, 1.0, 64, None, 1.0, ("entropy",))
        (lp.sum() + ent.sum()).backward()
        got.append((lp, ent, h.grad.clone(), w.grad.clone()))
    (a, b) = got
    assert b[0].dtype == torch.float32 and b[2].dtype == torch.float32 and b[3].dtype == torch.float32
    # both compute the projection in bf16; prefopt_fast rounds the fp32-accumulated weight
    # gradient once to bf16 before the cast back (see the module docstring)
    for x, z in zip(a, b):
        torch.testing.assert_close(z, x, rtol=2e-2, atol=2e-2)


def test_fallback_to_trl_kernel_for_logit_scale_zero():
    h = torch.randn(4, 8)
    w = torch.randn(30, 8)
    y = torch.randint(0, 30, (4,))
    ptrl._warned.clear()
    with pytest.warns(RuntimeWarning, match="logit_scale == 0"):
        out = ptrl.PrefoptChunkedLogProbFunction.apply(h, w, None, y, 1.0, 64, None, 0.0, ())
    torch.testing.assert_close(out[0], torch.full((4,), -torch.log(torch.tensor(30.0)).item()))


def test_model_forward_through_patched_head_matches_trl():
    """add_fused_lm_head's forward (CPU: every position scored, masked after) with and without the patch."""
    model = tiny_lm()
    trl_utils.add_fused_lm_head(model, temperature=0.8, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    ids = torch.randint(3, V, (3, 9))
    labels = ids.clone()
    labels[:, :4] = -100
    labels[2, 6:] = -100

    def run():
        model.zero_grad()
        out = model(input_ids=ids, labels=labels, fused_lm_head=True)
        (out.log_probs.sum() + 0.1 * out.entropy.sum()).backward()
        return out, {n: p.grad.clone() for n, p in model.named_parameters()}

    a, ga = run()
    with ptrl.patched_trl():
        b, gb = run()
    for f in ("loss", "log_probs", "entropy", "mean_logits"):
        torch.testing.assert_close(getattr(b, f), getattr(a, f), rtol=RTOL, atol=1e-5, msg=f)
    assert torch.equal(a.is_top1, b.is_top1) and torch.equal(a.label_mask, b.label_mask)
    for n in ga:
        torch.testing.assert_close(gb[n], ga[n], rtol=1e-4, atol=1e-6, msg=n)


# --------------------------------------------------------------------------- DPO


def _dpo_run(cls, tok, *, lora=None, ref_seed=None, patch_only=False, **cfg):
    """lora=None: full fine-tuning against a reference model; "model": a PeftModel is passed (TRL copies its
    adapter as the "ref" adapter); "config": a peft_config is passed (the reference is the base model,
    adapters disabled; the adapter starts random so the two differ from step 0)."""
    model = tiny_lm()
    ref, peft_config = None, None
    lora_kw = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, init_lora_weights=False)
    if lora is not None:
        peft = pytest.importorskip("peft")
        if lora == "model":
            model = peft.get_peft_model(model, peft.LoraConfig(**lora_kw))
        else:
            peft_config = peft.LoraConfig(**lora_kw)
    else:
        ref = copy.deepcopy(model) if ref_seed is None else tiny_lm(ref_seed)
    if cfg.get("precompute_ref_log_probs"):
        cfg.setdefault("precompute_ref_batch_size", 4)
    args = trl.DPOConfig(**common_args(max_length=16, **cfg))
    kw = dict(
        model=model,
        ref_model=ref,
        args=args,
        train_dataset=preference_dataset(),
        processing_class=tok,
        peft_config=peft_config,
    )
    if patch_only:
        with ptrl.patched_trl():
            return _train(cls, **kw)
    return _train(cls, **kw)


DPO_CASES = {
    "sigmoid": dict(),
    "ipo_precomputed_ref": dict(loss_type=["ipo"], beta=0.5, precompute_ref_log_probs=True, ref_seed=1),
    "robust_lora_ref_adapter": dict(loss_type=["robust"], label_smoothing=0.1, lora="model"),
    "sigmoid_lora_adapters_disabled_precomputed_ref": dict(lora="config", precompute_ref_log_probs=True),
    "mixed_sft_ld_alpha_wpo_js": dict(
        loss_type=["sigmoid_norm", "sft"], loss_weights=[1.0, 0.3], ld_alpha=0.5, f_divergence_type="js_divergence"
    ),
}


@pytest.mark.parametrize("name", list(DPO_CASES))
def test_dpo_trainer_matches_trl(tok, name):
    cfg = dict(DPO_CASES[name])
    ref = _dpo_run(trl.DPOTrainer, tok, **cfg)
    ours = _dpo_run(ptrl.DPOTrainer, tok, **cfg)
    assert isinstance(ours[0], ptrl.DPOTrainer)
    assert _moved(ref)
    _compare_runs(ref, ours)
    assert not ptrl.is_trl_patched()


def test_dpo_wpo_weighting_matches_trl(tok):
    # TRL 1.16 multiplies the weights in place (`per_sequence_loss *= ...`), which breaks its own
    # backward for losses whose backward reads their output (hinge, sft); sigmoid is fine
    cfg = dict(use_weighting=True, beta=0.3)
    _compare_runs(_dpo_run(trl.DPOTrainer, tok, **cfg), _dpo_run(ptrl.DPOTrainer, tok, **cfg))


def test_patch_alone_under_trl_dpo_trainer(tok):
    ref = _dpo_run(trl.DPOTrainer, tok, loss_type=["sigmoid", "ipo"])
    ours = _dpo_run(trl.DPOTrainer, tok, loss_type=["sigmoid", "ipo"], patch_only=True)
    _compare_runs(ref, ours)
    assert trl_utils._ChunkedLogProbFunction is ChunkedLogProbFunction


def test_dpo_trainer_patches_only_while_it_runs(tok, monkeypatch):
    seen = []
    real = ptrl.PrefoptChunkedLogProbFunction.apply

    def spy(*a, **k):
        seen.append(True)
        return real(*a, **k)

    monkeypatch.setattr(ptrl.PrefoptChunkedLogProbFunction, "apply", staticmethod(spy))
    tr, _, _ = _dpo_run(ptrl.DPOTrainer, tok, precompute_ref_log_probs=True)
    assert seen and not ptrl.is_trl_patched()
    n = len(seen)
    batch = next(iter(tr.get_train_dataloader()))
    tr.compute_loss(tr.model, tr._prepare_inputs(batch))  # a direct call patches too
    assert len(seen) > n and not ptrl.is_trl_patched()
    seen.clear()
    off = ptrl.DPOTrainer(
        model=tiny_lm(),
        ref_model=tiny_lm(),
        args=trl.DPOConfig(**common_args(max_length=16)),
        train_dataset=preference_dataset(),
        processing_class=tok,
        prefopt_lm_head=False,
    )
    off.compute_loss(off.model, off._prepare_inputs(next(iter(off.get_train_dataloader()))))
    assert not seen


@pytest.mark.parametrize(
    "cfg, match",
    [
        (dict(loss_type=["robust"], label_smoothing=0.6), "label_smoothing"),
        (dict(loss_type=["exo_pair"], label_smoothing=1.0), "label_smoothing"),
        (dict(beta=0.0), "beta"),
    ],
)
def test_dpo_unsupported_options_fail_at_construction(tok, cfg, match):
    with pytest.raises(ValueError, match=match):
        ptrl.DPOTrainer(
            model=tiny_lm(),
            ref_model=tiny_lm(),
            args=trl.DPOConfig(**common_args(**cfg)),
            train_dataset=preference_dataset(),
            processing_class=tok,
        )
    assert not ptrl.is_trl_patched()


# --------------------------------------------------------------------------- reward model


def _reward_run(cls, tok, *, margin, **cfg):
    torch.manual_seed(0)
    model = transformers.LlamaForSequenceClassification(llama_config(num_labels=1))
    ds = preference_dataset()
    if margin:
        ds = ds.add_column("margin", [0.1 * i for i in range(len(ds))])
    args = trl.RewardConfig(**common_args(max_length=16, **cfg))
    return _train(cls, model=model, args=args, train_dataset=ds, processing_class=tok)


@pytest.mark.parametrize("margin, center", [(True, 0.05), (False, None)])
def test_reward_trainer_matches_trl(tok, margin, center):
    cfg = dict(center_rewards_coefficient=center)
    ref = _reward_run(trl.RewardTrainer, tok, margin=margin, **cfg)
    ours = _reward_run(ptrl.RewardTrainer, tok, margin=margin, **cfg)
    assert _moved(ref)
    assert {"accuracy", "margin", "min_reward", "mean_reward", "max_reward"} <= set(ours[1][0])
    _compare_runs(ref, ours)


def test_reward_negative_centering_fails_at_construction(tok):
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="center_rewards_coefficient"):
        ptrl.RewardTrainer(
            model=transformers.LlamaForSequenceClassification(llama_config(num_labels=1)),
            args=trl.RewardConfig(**common_args(center_rewards_coefficient=-0.1)),
            train_dataset=preference_dataset(),
            processing_class=tok,
        )


# --------------------------------------------------------------------------- GRPO


@pytest.fixture(scope="module")
def tiny_lm_dir(tmp_path_factory):
    """GRPO loads its reference model from the policy's path: a saved tiny model."""
    path = tmp_path_factory.mktemp("tiny_llama")
    tiny_lm().save_pretrained(path)
    return str(path)


def _reward_len_mod3(completions, **kw):
    return [float(len(c.split()) % 3) + 0.1 * len(c) for c in completions]


def prompt_dataset(n=8, seed=0):
    r = random.Random(seed)
    return datasets.Dataset.from_list([dict(prompt=_words(r, 1, 4)) for _ in range(n)])


def _grpo_run(cls, tok, path, **cfg):
    args = trl.GRPOConfig(
        **common_args(
            per_device_train_batch_size=4,
            num_generations=2,
            max_completion_length=5,
            model_init_kwargs={"dtype": torch.float32},
            **cfg,
        )
    )
    return _train(
        cls, model=path, reward_funcs=_reward_len_mod3, args=args, train_dataset=prompt_dataset(), processing_class=tok
    )


GRPO_CASES = {
    "grpo_kl_entropy_two_iterations": dict(beta=0.04, num_iterations=2, entropy_coef=0.01, learning_rate=0.5),
    "dapo_gspo_delta_accumulation": dict(
        loss_type="dapo",
        importance_sampling_level="sequence",
        delta=2.0,
        epsilon_high=0.28,
        gradient_accumulation_steps=2,
        entropy_coef=0.02,
    ),
    "sapo_kl_entropy_two_iterations": dict(
        loss_type="sapo", beta=0.04, num_iterations=2, entropy_coef=0.01, learning_rate=0.5
    ),
}


@pytest.mark.parametrize("name", list(GRPO_CASES))
def test_grpo_trainer_matches_trl(tok, tiny_lm_dir, name):
    cfg = GRPO_CASES[name]
    ref = _grpo_run(trl.GRPOTrainer, tok, tiny_lm_dir, **cfg)
    ours = _grpo_run(ptrl.GRPOTrainer, tok, tiny_lm_dir, **cfg)
    assert _moved(ref)
    _compare_runs(ref, ours)
    assert not ptrl.is_trl_patched()


@pytest.fixture(scope="module")
def grpo_pair(tok, tiny_lm_dir):
    """One TRL and one prefopt_fast GRPOTrainer on identical models, for direct _compute_loss calls."""
    out = []
    for cls in (trl.GRPOTrainer, ptrl.GRPOTrainer):
        args = trl.GRPOConfig(
            **common_args(
                per_device_train_batch_size=4,
                num_generations=2,
                max_completion_length=6,
                model_init_kwargs={"dtype": torch.float32},
            )
        )
        out.append(
            cls(
                model=tiny_lm_dir,
                reward_funcs=_reward_len_mod3,
                args=args,
                train_dataset=prompt_dataset(),
                processing_class=tok,
            )
        )
    return out


def _grpo_inputs(B=4, P=3, T=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    completion_mask = torch.ones(B, T, dtype=torch.long)
    completion_mask[1, 4:] = 0
    completion_mask[3, 2:] = 0
    inputs = {
        "prompt_ids": torch.randint(3, V, (B, P), generator=g),
        "prompt_mask": torch.ones(B, P, dtype=torch.long),
        "completion_ids": torch.randint(3, V, (B, T), generator=g),
        "completion_mask": completion_mask,
        "advantages": torch.randn(B, generator=g),
        "num_items_in_batch": completion_mask.sum().float(),
    }
    return inputs, g


def _perturbed_logps(trainer, inputs, g, scale):
    """Per-token log-probs of the current model, perturbed: old / reference / sampling log-probs."""
    with torch.no_grad():
        ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
        am = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
        with ptrl.patched_trl():
            lp, _, _ = trainer._get_per_token_logps_and_entropies(
                trainer.model, ids, am, inputs["completion_ids"].shape[1]
            )
    return lp + scale * torch.randn(lp.shape, generator=g)


LOSS_CASES = {
    "grpo_old_ref_toolmask_delta": dict(
        attrs=dict(beta=0.05), args=dict(delta=1.5, use_bias_correction_kl=True), old=0.3, ref=0.2, tool_mask=True
    ),
    "bnpo_off_policy_mask": dict(attrs=dict(loss_type="bnpo", off_policy_mask_threshold=0.01), old=0.4, sampling=0.5),
    "dr_grpo_top_entropy": dict(attrs=dict(loss_type="dr_grpo", top_entropy_quantile=0.5), old=0.3),
    "dapo_vllm_is_ratio_train_accum": dict(
        attrs=dict(
            loss_type="dapo",
            use_vllm=True,
            vllm_importance_sampling_correction=True,
            current_gradient_accumulation_steps=2,
            entropy_coef=0.03,
            _entropy_bonus_enabled=True,
        ),
        args=dict(steps_per_generation=2),
        train=True,
        old=0.3,
        is_ratio=True,
    ),
    "gspo_grpo_token_advantages": dict(
        attrs=dict(importance_sampling_level="sequence", beta=0.02), old=0.05, ref=0.1, token_adv=True
    ),
    "luspo_gspo_delta_kl": dict(
        attrs=dict(loss_type="luspo", importance_sampling_level="sequence", beta=0.03),
        args=dict(delta=2.0),
        old=0.1,
        ref=0.2,
    ),
    "cispo_kl_entropy_is_ratio_train_accum": dict(
        attrs=dict(
            loss_type="cispo",
            epsilon_high=1.2,
            beta=0.02,
            use_vllm=True,
            vllm_importance_sampling_correction=True,
            current_gradient_accumulation_steps=2,
            entropy_coef=0.03,
            _entropy_bonus_enabled=True,
        ),
        args=dict(steps_per_generation=2, delta=3.0),  # TRL ignores delta for cispo
        train=True,
        old=0.3,
        ref=0.2,
        is_ratio=True,
    ),
    "sapo_toolmask_token_adv": dict(
        attrs=dict(loss_type="sapo", beta=0.02),
        args=dict(sapo_temperature_pos=2.0, sapo_temperature_neg=0.5, use_bias_correction_kl=True),
        old=0.3,
        ref=0.1,
        tool_mask=True,
        token_adv=True,
    ),
    "vespo_off_policy_mask_args": dict(
        attrs=dict(loss_type="vespo", off_policy_mask_threshold=0.01, entropy_coef=0.02, _entropy_bonus_enabled=True),
        args=dict(vespo_k_pos=1.5, vespo_lambda_pos=0.5, vespo_k_neg=2.5, vespo_lambda_neg=1.0),
        old=0.2,
        sampling=0.3,
    ),
}


@pytest.mark.parametrize("name", list(LOSS_CASES))
def test_grpo_compute_loss_matches_trl(grpo_pair, name):
    case = LOSS_CASES[name]
    inputs, g = _grpo_inputs()
    trl_tr, our_tr = grpo_pair
    base = trl_tr
    if case.get("old"):
        inputs["old_per_token_logps"] = _perturbed_logps(base, inputs, g, case["old"])
    if case.get("ref"):
        inputs["ref_per_token_logps"] = _perturbed_logps(base, inputs, g, case["ref"])
    if case.get("sampling"):
        inputs["sampling_per_token_logps"] = _perturbed_logps(base, inputs, g, case["sampling"])
    if case.get("tool_mask"):
        inputs["tool_mask"] = (torch.rand(inputs["completion_mask"].shape, generator=g) > 0.3).long()
    if case.get("is_ratio"):
        inputs["importance_sampling_ratio"] = torch.rand(inputs["completion_mask"].shape, generator=g) + 0.5
    if case.get("token_adv"):
        inputs["advantages"] = torch.randn(inputs["completion_mask"].shape, generator=g)

    results = []
    for tr in (trl_tr, our_tr):
        saved_attrs = {k: getattr(tr, k, _MISSING) for k in case.get("attrs", {})}
        saved_args = {k: getattr(tr.args, k) for k in case.get("args", {})}
        for k, v in case.get("attrs", {}).items():
            setattr(tr, k, v)
        for k, v in case.get("args", {}).items():
            setattr(tr.args, k, v)
        tr.model.train(case.get("train", False))
        tr._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        tr.model.zero_grad()
        try:
            loss = tr.compute_loss(tr.model, dict(inputs))
            loss.backward()
        finally:
            for k, v in saved_attrs.items():
                if v is _MISSING:
                    delattr(tr, k)
                else:
                    setattr(tr, k, v)
            for k, v in saved_args.items():
                setattr(tr.args, k, v)
        mode = "train" if case.get("train") else "eval"
        grads = {n: p.grad.clone() for n, p in tr.model.named_parameters() if p.grad is not None}
        results.append((loss.detach(), dict(tr._metrics[mode]), grads))
    (la, ma, ga), (lb, mb, gb) = results
    assert la.abs() > 0
    torch.testing.assert_close(lb, la, rtol=RTOL, atol=ATOL)
    assert set(ma) == set(mb), set(ma) ^ set(mb)
    for k in ma:
        torch.testing.assert_close(
            torch.tensor(mb[k]), torch.tensor(ma[k]), rtol=RTOL, atol=ATOL, msg=k, equal_nan=True
        )
    assert ga.keys() == gb.keys() and ga
    for n in ga:
        torch.testing.assert_close(gb[n], ga[n], rtol=1e-4, atol=1e-7, msg=n)


@pytest.mark.parametrize(
    "cfg, match",
    [
        (dict(loss_type="vespo", use_vllm=True), "vllm_importance_sampling_correction"),
        (dict(use_adaptive_entropy=True), "use_adaptive_entropy"),
        (dict(top_entropy_quantile=0.2, entropy_coef=0.01), "top_entropy_quantile"),
        (dict(delta=1.1), "delta"),
    ],
)
def test_grpo_unsupported_options_fail_at_construction(tok, tiny_lm_dir, cfg, match):
    args = trl.GRPOConfig(
        **common_args(per_device_train_batch_size=4, num_generations=2, max_completion_length=5, **cfg)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match=match):
            ptrl.GRPOTrainer(
                model=tiny_lm_dir,
                reward_funcs=_reward_len_mod3,
                args=args,
                train_dataset=prompt_dataset(),
                processing_class=tok,
            )
    assert not ptrl.is_trl_patched()
