"""The bad-input matrix: every public function, every argument given a wrong type, dtype,
shape, device or value.

Generated from two tables, not written case by case:

- ``FUNCS``: each public function with a factory of VALID arguments (small CPU tensors) and
  the KIND of each argument it takes;
- ``KINDS``: for each kind of argument, the wrong values to try, each with the exception
  class it must raise (TypeError for a wrong type or dtype, ValueError for a wrong shape,
  device, or value out of range).

Every cell calls the function with all arguments valid but one and checks that

1. it raises exactly that exception class (not a RuntimeError from deep inside torch, not
   a crash, not silently returning);
2. the message names the argument and says what was expected (``must ...``);
3. no input was touched: every tensor argument is bitwise identical afterwards (a rejected
   call must not partially write, e.g. an in-place backward over the logits).

The device cells use ``meta`` tensors to stand in for "another device" (labels on a GPU
with logits on the CPU behave the same). Cells whose expectation the package does not meet
yet are listed in ``KNOWN_GAPS`` and run as strict xfails (so a fix shows up as XPASS).
"""

import inspect
import math
import re
from typing import Any, Callable, Dict, List, Tuple

import pytest
import torch
from conftest import one_process_group_ctx  # noqa: E402

import prefopt_fast as pf
from prefopt_fast import linear as pfl

B, T, V, H = 2, 3, 11, 8


def _g():
    return torch.Generator().manual_seed(0)


def _logits(*lead):
    return torch.randn(*lead, V, generator=_g())


def _labels(*lead):
    y = torch.randint(0, V, lead, generator=_g())
    y.view(-1)[0] = -100
    return y


def _vec(n=B, lo=-30.0):
    return lo * torch.rand(n, generator=_g())


def _nonleaf_logits(*lead):
    """A buffer that requires grad and is not a leaf (as an lm_head output): what an
    in-place backward may overwrite."""
    return _logits(*lead).requires_grad_() * 1.0


# ----------------------------------------------------------------------------- FUNCS
# name -> (callable taking the argument dict, valid-argument factory, {argument: kind})


def _call(fn):
    return lambda a: fn(**a)


def _ctor(cls):
    return lambda a: cls(**a)


def _module_call(cls, init):
    return lambda a: cls(**init)(**a)


def _vocab_parallel(fn):
    """Call fn with process_group = a one-process group; a "WORLD" placeholder value stands for it."""

    def call(a):
        with one_process_group_ctx() as group:
            if a.get("process_group") == "WORLD":
                a = {**a, "process_group": group}
            return fn(**a)

    return call


FUNCS: Dict[str, Tuple[Callable, Callable[[], dict], Dict[str, str]]] = {
    "token_logprobs": (
        _call(pf.token_logprobs),
        lambda: dict(
            logits=_logits(B, T),
            labels=_labels(B, T),
            temperature=0.7,
            ignore_index=-100,
            stats=("entropy",),
            inplace_backward=False,
            backend="auto",
        ),
        dict(
            logits="logits",
            labels="labels",
            temperature="temperature",
            ignore_index="int",
            stats="stats",
            inplace_backward="bool",
            backend="backend",
        ),
    ),
    "token_logprobs(inplace_backward=True)": (
        _call(pf.token_logprobs),
        lambda: dict(
            logits=_nonleaf_logits(B, T),
            labels=_labels(B, T),
            temperature=torch.full((B, T), 0.5),
            inplace_backward=True,
        ),
        dict(logits="logits", labels="labels", temperature="temperature"),
    ),
    "token_logprobs(kl)": (
        _call(pf.token_logprobs),
        lambda: dict(logits=_logits(B, T), labels=_labels(B, T), stats=("kl",), ref_logits=_logits(B, T) + 0.1),
        dict(ref_logits="ref_logits"),
    ),
    "sequence_logprobs": (
        _call(pf.sequence_logprobs),
        lambda: dict(
            logits=_logits(B, T),
            labels=_labels(B, T),
            temperature=1.0,
            average=False,
            backend="auto",
            inplace_backward=False,
            ignore_index=-100,
        ),
        dict(
            logits="logits",
            labels="labels",
            temperature="temperature",
            average="bool",
            backend="backend",
            inplace_backward="bool",
            ignore_index="int",
        ),
    ),
    "sequence_logprobs(packed)": (
        _call(pf.sequence_logprobs),
        lambda: dict(logits=_logits(5), labels=_labels(5), cu_seqlens=torch.tensor([0, 2, 5])),
        dict(cu_seqlens="cu_seqlens", labels="packed_labels"),
    ),
    "logits_dpo_loss": (
        _call(pf.logits_dpo_loss),
        lambda: dict(
            logits=_logits(2 * B, T),
            labels=_labels(2 * B, T),
            ref_logits=_logits(2 * B, T) + 0.1,
            beta=0.1,
            loss_type="sigmoid",
            temperature=1.0,
            inplace_backward=False,
            average=True,
            reduction="none",
        ),
        dict(
            logits="logits",
            labels="labels",
            ref_logits="ref_logits_seq",
            beta="pos_float",
            loss_type="dpo_loss_type",
            temperature="temperature",
            inplace_backward="bool",
            average="bool",
            reduction="reduction",
        ),
    ),
    "logits_dpo_loss(precomputed ref)": (
        _call(pf.logits_dpo_loss),
        lambda: dict(
            logits=_logits(2 * B, T), labels=_labels(2 * B, T), ref_chosen_logps=_vec(), ref_rejected_logps=_vec()
        ),
        dict(ref_chosen_logps="vector", ref_rejected_logps="vector"),
    ),
    "ppo_loss": (
        _call(pf.ppo_loss),
        lambda: dict(
            logits=_logits(B, T),
            labels=_labels(B, T),
            old_logps=-torch.rand(B, T, generator=_g()),
            advantages=torch.randn(B, generator=_g()),
            ref_logps=-torch.rand(B, T, generator=_g()),
            loss_mask=torch.ones(B, T, dtype=torch.bool),
            kl_coef=0.1,
            kl_estimator="k3",
            clip_eps_low=0.2,
            entropy_coef=0.01,
            loss_agg_mode="token-mean",
            temperature=1.0,
            is_weights=torch.ones(B, T),
            importance_sampling_level="token",
            kl_ratio_correction=False,
            dual_clip=3.0,
            clip_eps_high=0.28,
            convention=None,
            loss_type_args=None,
        ),
        dict(
            logits="logits_3d",
            labels="labels",
            old_logps="bt",
            advantages="advantages",
            ref_logps="bt",
            loss_mask="mask",
            kl_coef="nonneg_float",
            kl_estimator="kl_estimator",
            clip_eps_low="nonneg_float",
            entropy_coef="real",
            loss_agg_mode="agg",
            temperature="temperature",
            is_weights="advantages",
            importance_sampling_level="is_level",
            kl_ratio_correction="bool",
            dual_clip="dual_clip",
            clip_eps_high="nonneg_float",
            convention="convention",
            loss_type_args="loss_type_args",
        ),
    ),
    "ppo_loss(full kl, dr_grpo)": (
        _call(pf.ppo_loss),
        lambda: dict(
            logits=_logits(B, T),
            labels=_labels(B, T),
            old_logps=None,
            advantages=torch.randn(B, T, generator=_g()),
            ref_logits=_logits(B, T) + 0.1,
            kl_coef=0.1,
            kl_estimator="full",
            loss_agg_mode="seq-mean-token-sum-norm",
            max_length=T,
            global_num_tokens=None,
        ),
        dict(ref_logits="ref_logits", max_length="max_length"),
    ),
    "ppo_loss(token-mean normalizer)": (
        _call(pf.ppo_loss),
        lambda: dict(
            logits=_logits(B, T),
            labels=_labels(B, T),
            old_logps=None,
            advantages=torch.randn(B, T, generator=_g()),
            global_num_tokens=12.0,
        ),
        dict(global_num_tokens="normalizer"),
    ),
    "dpo_loss": (
        _call(pf.dpo_loss),
        lambda: dict(
            chosen_logps=_vec(),
            rejected_logps=_vec(),
            ref_chosen_logps=_vec(),
            ref_rejected_logps=_vec(),
            beta=0.1,
            loss_type="sigmoid",
            pair_weights=torch.ones(B),
            f_divergence="reverse_kl",
            discopop_tau=0.05,
            reduction="none",
        ),
        dict(
            chosen_logps="vector",
            rejected_logps="vector",
            ref_chosen_logps="vector",
            ref_rejected_logps="vector",
            beta="pos_float",
            loss_type="dpo_loss_type",
            pair_weights="vector",
            f_divergence="f_divergence",
            discopop_tau="pos_float",
            reduction="reduction",
        ),
    ),
    "dpo_loss(ipo, robust)": (
        _call(pf.dpo_loss),
        lambda: dict(
            chosen_logps=_vec(),
            rejected_logps=_vec(),
            loss_type=["ipo", "robust"],
            label_smoothing=0.1,
            chosen_lengths=torch.tensor([3, 4]),
            rejected_lengths=torch.tensor([2, 5]),
        ),
        dict(chosen_lengths="lengths", rejected_lengths="lengths", label_smoothing="smoothing"),
    ),
    "cpo_loss": (
        _call(pf.cpo_loss),
        lambda: dict(
            chosen_logps=_vec(),
            rejected_logps=_vec(),
            chosen_lengths=torch.tensor([3, 4]),
            rejected_lengths=torch.tensor([2, 5]),
            beta=0.1,
            loss_type="simpo",
        ),
        dict(
            chosen_logps="vector",
            rejected_logps="vector",
            chosen_lengths="lengths",
            rejected_lengths="lengths",
            beta="pos_float",
            loss_type="cpo_loss_type",
        ),
    ),
    "simpo_loss": (
        _call(pf.simpo_loss),
        lambda: dict(
            chosen_logps=_vec(),
            rejected_logps=_vec(),
            chosen_lengths=torch.tensor([3, 4]),
            rejected_lengths=torch.tensor([2, 5]),
            beta=2.0,
            simpo_gamma=1.0,
            reduction="none",
        ),
        dict(
            chosen_logps="vector",
            rejected_logps="vector",
            chosen_lengths="lengths",
            rejected_lengths="lengths",
            beta="pos_float",
            simpo_gamma="real",
            reduction="reduction",
        ),
    ),
    "orpo_loss": (
        _call(pf.orpo_loss),
        lambda: dict(
            chosen_logps=_vec(),
            rejected_logps=_vec(),
            chosen_lengths=torch.tensor([3, 4]),
            rejected_lengths=torch.tensor([2, 5]),
            beta=0.1,
        ),
        dict(
            chosen_logps="vector",
            rejected_logps="vector",
            chosen_lengths="lengths",
            rejected_lengths="lengths",
            beta="pos_float",
        ),
    ),
    "bradley_terry_loss": (
        _call(pf.bradley_terry_loss),
        lambda: dict(
            chosen_rewards=torch.randn(B, 1, generator=_g()),
            rejected_rewards=torch.randn(B, generator=_g()),
            margin=torch.rand(B, generator=_g()),
            center_rewards_coefficient=0.01,
            reduction="sum",
        ),
        dict(
            chosen_rewards="vector",
            rejected_rewards="vector",
            margin="margin",
            center_rewards_coefficient="nonneg_float",
            reduction="reduction",
        ),
    ),
    "linear_token_logprobs": (
        _call(pfl.linear_token_logprobs),
        lambda: dict(
            hidden=torch.randn(B, T, H, generator=_g()),
            weight=torch.randn(V, H, generator=_g()),
            labels=_labels(B, T),
            bias=torch.randn(V, generator=_g()),
            temperature=0.9,
            chunk_size=2,
            logit_scale=1.0,
            softcap=None,
            stats=("entropy",),
            backend="auto",
            ignore_index=-100,
        ),
        dict(
            hidden="hidden",
            weight="weight",
            labels="labels",
            bias="bias",
            temperature="temperature",
            chunk_size="chunk_size",
            logit_scale="pos_float",
            softcap="opt_pos_float",
            stats="stats",
            backend="backend",
            ignore_index="int",
        ),
    ),
    "linear_sequence_logprobs": (
        _call(pfl.linear_sequence_logprobs),
        lambda: dict(
            hidden=torch.randn(5, H, generator=_g()),
            weight=torch.randn(V, H, generator=_g()),
            labels=_labels(5),
            cu_seqlens=torch.tensor([0, 2, 5]),
            average=True,
        ),
        dict(hidden="hidden", weight="weight", cu_seqlens="cu_seqlens", average="bool"),
    ),
    "linear_dpo_loss": (
        _call(pfl.linear_dpo_loss),
        lambda: dict(
            hidden=torch.randn(2 * B, T, H, generator=_g()),
            weight=torch.randn(V, H, generator=_g()),
            labels=_labels(2 * B, T),
            ref_chosen_logps=_vec(),
            ref_rejected_logps=_vec(),
            beta=0.1,
            average=True,
            reduction="sum",
        ),
        dict(
            hidden="hidden",
            weight="weight",
            labels="labels",
            ref_chosen_logps="vector",
            ref_rejected_logps="vector",
            beta="pos_float",
            average="bool",
            reduction="reduction",
        ),
    ),
    "linear_ppo_loss": (
        _call(pfl.linear_ppo_loss),
        lambda: dict(
            hidden=torch.randn(B, T, H, generator=_g()),
            weight=torch.randn(V, H, generator=_g()),
            labels=_labels(B, T),
            old_logps=-torch.rand(B, T, generator=_g()),
            advantages=torch.randn(B, generator=_g()),
            loss_agg_mode="seq-mean-token-mean",
        ),
        dict(
            hidden="hidden_3d",
            weight="weight",
            labels="labels",
            old_logps="bt",
            advantages="advantages",
            loss_agg_mode="agg",
        ),
    ),
    "dpo_loss(bco_pair, loss_weights)": (
        _call(pf.dpo_loss),
        lambda: dict(
            chosen_logps=_vec(),
            rejected_logps=_vec(),
            loss_type=["sigmoid", "bco_pair"],
            loss_weights=[1.0, 0.5],
            bco_delta=0.1,
        ),
        dict(loss_weights="loss_weights", bco_delta="bco_delta"),
    ),
    "dpo_loss(alpha_divergence)": (
        _call(pf.dpo_loss),
        lambda: dict(chosen_logps=_vec(), rejected_logps=_vec(), f_divergence="alpha_divergence", f_alpha=0.5),
        dict(f_divergence="f_divergence", f_alpha="real"),
    ),
    "cpo_loss(every option)": (
        _call(pf.cpo_loss),
        lambda: dict(
            chosen_logps=_vec(),
            rejected_logps=_vec(),
            chosen_lengths=torch.tensor([3, 4]),
            rejected_lengths=torch.tensor([2, 5]),
            loss_type="sigmoid",
            label_smoothing=0.1,
            cpo_alpha=1.0,
            simpo_gamma=0.5,
            alpha=0.1,
            nll_loss=torch.tensor(1.5),
            reduction="sum",
        ),
        dict(
            label_smoothing="smoothing_lt1",
            cpo_alpha="nonneg_float",
            simpo_gamma="real",
            alpha="real",
            nll_loss="nll_loss",
            reduction="reduction",
        ),
    ),
    "simpo_loss(nll)": (
        _call(pf.simpo_loss),
        lambda: dict(
            chosen_logps=_vec(),
            rejected_logps=_vec(),
            chosen_lengths=torch.tensor([3, 4]),
            rejected_lengths=torch.tensor([2, 5]),
            label_smoothing=0.1,
            cpo_alpha=1.0,
            alpha=0.1,
            nll_loss=torch.tensor(1.5),
        ),
        dict(label_smoothing="smoothing_lt1", cpo_alpha="nonneg_float", alpha="real", nll_loss="nll_loss"),
    ),
    "orpo_loss(nll_loss)": (
        _call(pf.orpo_loss),
        lambda: dict(
            chosen_logps=_vec(),
            rejected_logps=_vec(),
            chosen_lengths=torch.tensor([3, 4]),
            rejected_lengths=torch.tensor([2, 5]),
            nll_loss=torch.tensor(1.5),
            reduction="none",
        ),
        dict(nll_loss="nll_loss", reduction="reduction"),
    ),
    "ppo_loss(ignore_index, backend)": (
        _call(pf.ppo_loss),
        lambda: dict(
            logits=_logits(B, T),
            labels=_labels(B, T),
            old_logps=None,
            advantages=torch.randn(B, generator=_g()),
            ignore_index=-100,
            backend="auto",
        ),
        dict(ignore_index="int", backend="backend"),
    ),
    "pair_logprobs": (
        _call(pf.pair_logprobs),
        lambda: dict(
            logits=_logits(2 * B, T),
            labels=_labels(2 * B, T),
            ref_logits=_logits(2 * B, T) + 0.1,
            temperature=1.0,
            inplace_backward=False,
            ignore_index=-100,
            backend="auto",
            average=True,
        ),
        dict(
            logits="logits",
            labels="labels",
            ref_logits="ref_logits",
            temperature="temperature",
            inplace_backward="bool",
            ignore_index="int",
            backend="backend",
            average="bool",
        ),
    ),
    "pair_logprobs(packed)": (
        _call(pf.pair_logprobs),
        lambda: dict(logits=_logits(8), labels=_labels(8), cu_seqlens=torch.tensor([0, 2, 5, 6, 8])),
        dict(cu_seqlens="cu_seqlens"),
    ),
    "linear_token_logprobs(lora)": (
        _call(pfl.linear_token_logprobs),
        lambda: dict(
            hidden=torch.randn(B, T, H, generator=_g()),
            weight=torch.randn(V, H, generator=_g()),
            labels=_labels(B, T),
            lora=(torch.randn(2, H, generator=_g()), torch.randn(V, 2, generator=_g()), 0.5),
        ),
        dict(lora="lora"),
    ),
    "linear_sequence_logprobs(every option)": (
        _call(pfl.linear_sequence_logprobs),
        lambda: dict(
            hidden=torch.randn(B, T, H, generator=_g()),
            weight=torch.randn(V, H, generator=_g()),
            labels=_labels(B, T),
            bias=torch.randn(V, generator=_g()),
            temperature=0.9,
            ignore_index=-100,
            logit_scale=1.0,
            softcap=30.0,
            chunk_size=2,
            backend="auto",
            average=False,
        ),
        dict(
            labels="labels",
            bias="bias",
            temperature="temperature",
            ignore_index="int",
            softcap="opt_pos_float",
            backend="backend",
        ),
    ),
    "linear_pair_logprobs(ref model)": (
        _call(pfl.linear_pair_logprobs),
        lambda: dict(
            hidden=torch.randn(2 * B, T, H, generator=_g()),
            weight=torch.randn(V, H, generator=_g()),
            labels=_labels(2 * B, T),
            ref_hidden=torch.randn(2 * B, T, H + 1, generator=_g()),
            ref_weight=torch.randn(V, H + 1, generator=_g()),
            ref_bias=torch.randn(V, generator=_g()),
            average=True,
        ),
        dict(ref_hidden="ref_hidden", ref_weight="ref_weight", ref_bias="ref_bias", average="bool"),
    ),
    "linear_dpo_loss(packed, ref model)": (
        _call(pfl.linear_dpo_loss),
        lambda: dict(
            hidden=torch.randn(8, H, generator=_g()),
            weight=torch.randn(V, H, generator=_g()),
            labels=_labels(8),
            cu_seqlens=torch.tensor([0, 2, 5, 6, 8]),
            ref_hidden=torch.randn(8, H, generator=_g()),
            ref_weight=torch.randn(V, H, generator=_g()),
            chunk_size=3,
            loss_type="ipo",
        ),
        dict(cu_seqlens="cu_seqlens", ref_hidden="ref_hidden", ref_weight="ref_weight", loss_type="dpo_loss_type"),
    ),
    "linear_ppo_loss(every option)": (
        _call(pfl.linear_ppo_loss),
        lambda: dict(
            hidden=torch.randn(B, T, H, generator=_g()),
            weight=torch.randn(V, H, generator=_g()),
            labels=_labels(B, T),
            old_logps=None,
            advantages=torch.randn(B, T, generator=_g()),
            bias=torch.randn(V, generator=_g()),
            loss_mask=torch.ones(B, T),
            ref_logps=-torch.rand(B, T),
            kl_coef=0.1,
            kl_estimator="k3",
            temperature=0.9,
            softcap=30.0,
            is_weights=torch.ones(B),
            global_num_tokens=torch.tensor(6.0),
            ignore_index=-100,
        ),
        dict(
            labels="labels",
            bias="bias",
            loss_mask="mask",
            ref_logps="bt",
            kl_estimator="kl_estimator",
            temperature="temperature",
            softcap="opt_pos_float",
            is_weights="advantages",
            global_num_tokens="normalizer",
            ignore_index="int",
        ),
    ),
    # vocabulary-parallel entry points (prefopt_fast.distributed) on a one-process gloo group
    "token_logprobs(vocab-parallel)": (
        _vocab_parallel(pf.token_logprobs),
        lambda: dict(
            logits=_logits(B, T),
            labels=_labels(B, T),
            temperature=0.7,
            stats=("entropy",),
            process_group="WORLD",
            vocab_start=0,
            vocab_size=V,
            inplace_backward=False,
            ignore_index=-100,
        ),
        dict(
            logits="logits",
            labels="labels",
            temperature="temperature",
            stats="stats",
            process_group="group",
            vocab_start="vocab_start",
            vocab_size="vocab_size",
            inplace_backward="bool",
            ignore_index="int",
        ),
    ),
    "token_logprobs(vocab-parallel kl)": (
        _vocab_parallel(pf.token_logprobs),
        lambda: dict(
            logits=_logits(B, T),
            labels=_labels(B, T),
            stats=("kl",),
            ref_logits=_logits(B, T) + 0.1,
            process_group="WORLD",
        ),
        dict(ref_logits="ref_logits"),
    ),
    "linear_token_logprobs(vocab-parallel)": (
        _vocab_parallel(pfl.linear_token_logprobs),
        lambda: dict(
            hidden=torch.randn(B, T, H, generator=_g()),
            weight=torch.randn(V, H, generator=_g()),
            labels=_labels(B, T),
            bias=torch.randn(V, generator=_g()),
            process_group="WORLD",
            vocab_start=0,
            vocab_size=V,
        ),
        dict(
            hidden="hidden",
            weight="weight",
            labels="labels",
            bias="bias",
            process_group="group",
            vocab_start="vocab_start",
            vocab_size="vocab_size",
        ),
    ),
    "ppo_loss(vocab-parallel)": (
        _vocab_parallel(pf.ppo_loss),
        lambda: dict(
            logits=_logits(B, T),
            labels=_labels(B, T),
            old_logps=None,
            advantages=torch.randn(B, generator=_g()),
            loss_mask=torch.ones(B, T),
            process_group="WORLD",
        ),
        dict(labels="labels", loss_mask="mask", advantages="advantages"),
    ),
    "logits_dpo_loss(vocab-parallel)": (
        _vocab_parallel(pf.logits_dpo_loss),
        lambda: dict(
            logits=_logits(2 * B, T),
            labels=_labels(2 * B, T),
            ref_logits=_logits(2 * B, T) + 0.1,
            process_group="WORLD",
        ),
        dict(labels="labels", ref_logits="ref_logits_seq"),
    ),
    # configuration-only modules: validated once, in __init__
    "DPOLoss()": (
        _ctor(pf.DPOLoss),
        lambda: dict(beta=0.1, loss_type="sigmoid", reduction="none"),
        dict(beta="pos_float", loss_type="dpo_loss_type", reduction="reduction"),
    ),
    "LogitsDPOLoss()": (
        _ctor(pf.LogitsDPOLoss),
        lambda: dict(beta=0.1, temperature=1.0, ignore_index=-100, inplace_backward=False, average=True),
        dict(
            beta="pos_float",
            temperature="float_temperature",
            ignore_index="int",
            inplace_backward="bool",
            average="bool",
        ),
    ),
    "PPOLoss()": (
        _ctor(pf.PPOLoss),
        lambda: dict(kl_coef=0.1, kl_estimator="k3", temperature=1.0, loss_agg_mode="token-mean", backend="auto"),
        dict(
            kl_coef="nonneg_float",
            kl_estimator="kl_estimator",
            temperature="float_temperature",
            loss_agg_mode="agg",
            backend="backend_ctor",
        ),
    ),
    "SequenceLogProbs()": (
        _ctor(pf.SequenceLogProbs),
        lambda: dict(temperature=1.0, average=False, ignore_index=-100, inplace_backward=False),
        dict(temperature="float_temperature", average="bool", ignore_index="int", inplace_backward="bool"),
    ),
    "BradleyTerryLoss()": (
        _ctor(pf.BradleyTerryLoss),
        lambda: dict(center_rewards_coefficient=0.01, reduction="sum"),
        dict(center_rewards_coefficient="nonneg_float", reduction="reduction"),
    ),
    "LinearSequenceLogProbs()": (
        _ctor(pfl.LinearSequenceLogProbs),
        lambda: dict(chunk_size=4, logit_scale=1.0),
        dict(chunk_size="chunk_size", logit_scale="pos_float"),
    ),
    "DPOLoss(bco_running_mean)": (
        _ctor(pf.DPOLoss),
        lambda: dict(loss_type="bco_pair", bco_running_mean=True, label_smoothing=0.0, f_divergence="reverse_kl"),
        dict(bco_running_mean="bool", label_smoothing="nonneg_float", f_divergence="f_divergence"),
    ),
    "LinearDPOLoss()": (
        _ctor(pfl.LinearDPOLoss),
        lambda: dict(
            beta=0.1,
            temperature=1.0,
            logit_scale=1.0,
            softcap=None,
            chunk_size=4,
            ignore_index=-100,
            backend="auto",
            average=True,
        ),
        dict(
            beta="pos_float",
            temperature="float_temperature",
            logit_scale="pos_float",
            softcap="opt_pos_float",
            chunk_size="chunk_size",
            ignore_index="int",
            backend="backend_ctor",
            average="bool",
        ),
    ),
    "LinearCPOLoss()": (
        _ctor(pfl.LinearCPOLoss),
        lambda: dict(
            beta=0.1,
            loss_type="simpo",
            label_smoothing=0.1,
            cpo_alpha=1.0,
            simpo_gamma=0.5,
            alpha=0.1,
            reduction="none",
            temperature=1.0,
            logit_scale=1.0,
            softcap=None,
            chunk_size=4,
            ignore_index=-100,
            backend="auto",
        ),
        dict(
            beta="pos_float",
            loss_type="cpo_loss_type",
            label_smoothing="smoothing_lt1",
            cpo_alpha="nonneg_float",
            simpo_gamma="real",
            alpha="real",
            reduction="reduction",
            temperature="float_temperature",
            logit_scale="pos_float",
            softcap="opt_pos_float",
            chunk_size="chunk_size",
            ignore_index="int",
            backend="backend_ctor",
        ),
    ),
    "LinearSimPOLoss()": (
        _ctor(pfl.LinearSimPOLoss),
        lambda: dict(beta=0.1, simpo_gamma=0.5, cpo_alpha=0.0, reduction="sum", chunk_size=4),
        dict(
            beta="pos_float",
            simpo_gamma="real",
            cpo_alpha="nonneg_float",
            reduction="reduction",
            chunk_size="chunk_size",
        ),
    ),
    "LinearORPOLoss()": (
        _ctor(pfl.LinearORPOLoss),
        lambda: dict(beta=0.1, reduction="mean", softcap=30.0, backend="auto"),
        dict(beta="pos_float", reduction="reduction", softcap="opt_pos_float", backend="backend_ctor"),
    ),
    "LinearPPOLoss()": (
        _ctor(pfl.LinearPPOLoss),
        lambda: dict(kl_estimator="k3", logit_scale=1.0, softcap=None, chunk_size=4, max_length=None),
        dict(
            kl_estimator="kl_estimator",
            logit_scale="pos_float",
            softcap="opt_pos_float",
            chunk_size="chunk_size",
        ),
    ),
    "DPOLoss(bco_delta)": (
        _ctor(pf.DPOLoss),
        lambda: dict(loss_type="bco_pair", bco_delta=0.1),
        dict(bco_delta="bco_delta_ctor"),
    ),
    "PPOLoss(no process group)": (
        _ctor(pf.PPOLoss),
        lambda: dict(vocab_start=None, vocab_size=V),
        dict(vocab_start="vocab_start_no_group"),
    ),
    "PPOLoss(dr_grpo)": (
        _ctor(pf.PPOLoss),
        lambda: dict(loss_agg_mode="dr_grpo", max_length=4, importance_sampling_level="sequence", dual_clip=3.0),
        dict(max_length="max_length", importance_sampling_level="is_level", dual_clip="dual_clip"),
    ),
    # the modules' forward arguments
    "DPOLoss.forward": (
        _module_call(pf.DPOLoss, dict(loss_type="ipo")),
        lambda: dict(
            chosen_logps=_vec(),
            rejected_logps=_vec(),
            ref_chosen_logps=_vec(),
            ref_rejected_logps=_vec(),
            chosen_lengths=torch.tensor([3, 4]),
            rejected_lengths=torch.tensor([2, 5]),
            pair_weights=torch.ones(B),
        ),
        dict(
            chosen_logps="vector",
            rejected_logps="vector",
            ref_chosen_logps="vector",
            ref_rejected_logps="vector",
            chosen_lengths="lengths",
            rejected_lengths="lengths",
            pair_weights="vector",
        ),
    ),
    "DPOLoss(bco_running_mean).forward": (
        _module_call(pf.DPOLoss, dict(loss_type="bco_pair", bco_running_mean=True)),
        lambda: dict(chosen_logps=_vec(), rejected_logps=_vec(), ref_chosen_logps=_vec(), ref_rejected_logps=_vec()),
        dict(chosen_logps="vector", rejected_logps="vector", ref_chosen_logps="vector", ref_rejected_logps="vector"),
    ),
    "LogitsDPOLoss.forward": (
        _module_call(pf.LogitsDPOLoss, dict(inplace_backward=True)),
        lambda: dict(
            logits=_nonleaf_logits(2 * B, T),
            labels=_labels(2 * B, T),
            ref_logits=_logits(2 * B, T) + 0.1,
            pair_weights=torch.ones(B),
        ),
        dict(logits="logits", labels="labels", ref_logits="ref_logits", pair_weights="vector"),
    ),
    "LogitsDPOLoss(packed).forward": (
        _module_call(pf.LogitsDPOLoss, {}),
        lambda: dict(
            logits=_logits(8),
            labels=_labels(8),
            cu_seqlens=torch.tensor([0, 2, 5, 6, 8]),
            ref_chosen_logps=_vec(),
            ref_rejected_logps=_vec(),
        ),
        dict(cu_seqlens="cu_seqlens", ref_chosen_logps="vector", ref_rejected_logps="vector"),
    ),
    "PPOLoss.forward": (
        _module_call(pf.PPOLoss, dict(kl_coef=0.1)),
        lambda: dict(
            logits=_logits(B, T),
            labels=_labels(B, T),
            old_logps=-torch.rand(B, T, generator=_g()),
            advantages=torch.randn(B, generator=_g()),
            loss_mask=torch.ones(B, T, dtype=torch.bool),
            ref_logps=-torch.rand(B, T, generator=_g()),
            is_weights=torch.ones(B, T),
            global_num_tokens=5.0,
        ),
        dict(
            logits="logits_3d",
            labels="labels",
            old_logps="bt",
            advantages="advantages",
            loss_mask="mask",
            ref_logps="bt",
            is_weights="advantages",
            global_num_tokens="normalizer",
        ),
    ),
    "PPOLoss(full kl).forward": (
        _module_call(pf.PPOLoss, dict(kl_coef=0.1, kl_estimator="full")),
        lambda: dict(
            logits=_logits(B, T),
            labels=_labels(B, T),
            old_logps=None,
            advantages=torch.randn(B, generator=_g()),
            ref_logits=_logits(B, T) + 0.1,
        ),
        dict(ref_logits="ref_logits"),
    ),
    "SequenceLogProbs.forward": (
        _module_call(pf.SequenceLogProbs, {}),
        lambda: dict(logits=_logits(5), labels=_labels(5), cu_seqlens=torch.tensor([0, 2, 5])),
        dict(logits="logits", labels="labels", cu_seqlens="cu_seqlens"),
    ),
    "BradleyTerryLoss.forward": (
        _module_call(pf.BradleyTerryLoss, dict(center_rewards_coefficient=0.01)),
        lambda: dict(
            chosen_rewards=torch.randn(B, generator=_g()),
            rejected_rewards=torch.randn(B, generator=_g()),
            margin=torch.rand(B, generator=_g()),
        ),
        dict(chosen_rewards="vector", rejected_rewards="vector", margin="margin"),
    ),
    "LinearSequenceLogProbs.forward": (
        _module_call(pfl.LinearSequenceLogProbs, dict(chunk_size=2)),
        lambda: dict(
            hidden=torch.randn(5, H, generator=_g()),
            weight=torch.randn(V, H, generator=_g()),
            labels=_labels(5),
            bias=torch.randn(V, generator=_g()),
            cu_seqlens=torch.tensor([0, 2, 5]),
        ),
        dict(hidden="hidden", weight="weight", labels="labels", bias="bias", cu_seqlens="cu_seqlens"),
    ),
    "LinearDPOLoss.forward": (
        _module_call(pfl.LinearDPOLoss, dict(chunk_size=2)),
        lambda: dict(
            hidden=torch.randn(2 * B, T, H, generator=_g()),
            weight=torch.randn(V, H, generator=_g()),
            labels=_labels(2 * B, T),
            ref_hidden=torch.randn(2 * B, T, H, generator=_g()),
            ref_weight=torch.randn(V, H, generator=_g()),
            pair_weights=torch.ones(B),
        ),
        dict(
            hidden="hidden",
            weight="weight",
            labels="labels",
            ref_hidden="ref_hidden",
            ref_weight="ref_weight",
            pair_weights="vector",
        ),
    ),
    "LinearPPOLoss.forward": (
        _module_call(pfl.LinearPPOLoss, dict(kl_coef=0.1, chunk_size=2)),
        lambda: dict(
            hidden=torch.randn(B, T, H, generator=_g()),
            weight=torch.randn(V, H, generator=_g()),
            labels=_labels(B, T),
            old_logps=-torch.rand(B, T, generator=_g()),
            advantages=torch.randn(B, generator=_g()),
            ref_logps=-torch.rand(B, T, generator=_g()),
            loss_mask=torch.ones(B, T, dtype=torch.bool),
            bias=torch.randn(V, generator=_g()),
        ),
        dict(
            hidden="hidden_3d",
            weight="weight",
            labels="labels",
            old_logps="bt",
            advantages="advantages",
            ref_logps="bt",
            loss_mask="mask",
            bias="bias",
        ),
    ),
    "LinearCPOLoss.forward": (
        _module_call(pfl.LinearCPOLoss, dict(chunk_size=2)),
        lambda: dict(
            hidden=torch.randn(2 * B, T, H, generator=_g()),
            weight=torch.randn(V, H, generator=_g()),
            labels=_labels(2 * B, T),
            bias=torch.randn(V, generator=_g()),
            nll_loss=torch.tensor(1.5),
        ),
        dict(hidden="hidden", weight="weight", labels="labels", bias="bias", nll_loss="nll_loss"),
    ),
    "LinearSimPOLoss(packed).forward": (
        _module_call(pfl.LinearSimPOLoss, {}),
        lambda: dict(
            hidden=torch.randn(8, H, generator=_g()),
            weight=torch.randn(V, H, generator=_g()),
            labels=_labels(8),
            cu_seqlens=torch.tensor([0, 2, 5, 6, 8]),
        ),
        dict(hidden="hidden", weight="weight", cu_seqlens="cu_seqlens"),
    ),
    "LinearORPOLoss.forward": (
        _module_call(pfl.LinearORPOLoss, dict(chunk_size=2)),
        lambda: dict(
            hidden=torch.randn(2 * B, T, H, generator=_g()),
            weight=torch.randn(V, H, generator=_g()),
            labels=_labels(2 * B, T),
            lora=(torch.randn(2, H, generator=_g()), torch.randn(V, 2, generator=_g()), 0.5),
            nll_loss=torch.tensor(1.5),
        ),
        dict(hidden="hidden", weight="weight", labels="labels", lora="lora", nll_loss="nll_loss"),
    ),
    # the fused-linear twins of the reference-free heads
    "linear_cpo_loss": (
        _call(pfl.linear_cpo_loss),
        lambda: dict(
            hidden=torch.randn(2 * B, T, H, generator=_g()),
            weight=torch.randn(V, H, generator=_g()),
            labels=_labels(2 * B, T),
            bias=torch.randn(V, generator=_g()),
            temperature=0.9,
            chunk_size=2,
            softcap=30.0,
            beta=0.1,
            loss_type="simpo",
            label_smoothing=0.1,
            cpo_alpha=1.0,
            simpo_gamma=0.5,
            alpha=0.1,
            nll_loss=torch.tensor(1.5),
            reduction="none",
            ignore_index=-100,
            backend="auto",
        ),
        dict(
            hidden="hidden",
            weight="weight",
            labels="labels",
            bias="bias",
            temperature="temperature",
            chunk_size="chunk_size",
            softcap="opt_pos_float",
            beta="pos_float",
            loss_type="cpo_loss_type",
            label_smoothing="smoothing_lt1",
            cpo_alpha="nonneg_float",
            simpo_gamma="real",
            alpha="real",
            nll_loss="nll_loss",
            reduction="reduction",
            ignore_index="int",
            backend="backend",
        ),
    ),
    "linear_simpo_loss": (
        _call(pfl.linear_simpo_loss),
        lambda: dict(
            hidden=torch.randn(8, H, generator=_g()),
            weight=torch.randn(V, H, generator=_g()),
            labels=_labels(8),
            cu_seqlens=torch.tensor([0, 2, 5, 6, 8]),
            lora=(torch.randn(2, H, generator=_g()), torch.randn(V, 2, generator=_g()), 0.5),
            logit_scale=1.0,
            beta=2.0,
            simpo_gamma=1.0,
            cpo_alpha=0.0,
            reduction="sum",
        ),
        dict(
            hidden="hidden",
            weight="weight",
            cu_seqlens="cu_seqlens",
            lora="lora",
            logit_scale="pos_float",
            beta="pos_float",
            simpo_gamma="real",
            cpo_alpha="nonneg_float",
            reduction="reduction",
        ),
    ),
    "linear_orpo_loss": (
        _call(pfl.linear_orpo_loss),
        lambda: dict(
            hidden=torch.randn(2 * B, T, H, generator=_g()),
            weight=torch.randn(V, H, generator=_g()),
            labels=_labels(2 * B, T),
            beta=0.1,
            nll_loss=torch.tensor(1.5),
            reduction="none",
        ),
        dict(
            hidden="hidden",
            weight="weight",
            labels="labels",
            beta="pos_float",
            nll_loss="nll_loss",
            reduction="reduction",
        ),
    ),
    # the per-token policy-gradient head (no vocabulary): logps [B, T] define B, T and the device
    "policy_loss": (
        _call(pf.policy_loss),
        lambda: dict(
            logps=-torch.rand(B, T, generator=_g()),
            old_logps=-torch.rand(B, T, generator=_g()),
            advantages=torch.randn(B, generator=_g()),
            mask=torch.ones(B, T, dtype=torch.bool),
            entropy=torch.rand(B, T, generator=_g()),
            ref_logps=-torch.rand(B, T, generator=_g()),
            kl_coef=0.1,
            kl_estimator="k3",
            clip_eps_low=0.2,
            clip_eps_high=0.28,
            dual_clip=3.0,
            entropy_coef=0.01,
            loss_agg_mode="token-mean",
            is_weights=torch.ones(B, T),
            importance_sampling_level="token",
            kl_ratio_correction=False,
            global_num_tokens=5.0,
        ),
        dict(
            logps="logps",
            old_logps="bt",
            advantages="advantages",
            mask="mask",
            entropy="bt",
            ref_logps="bt",
            kl_coef="nonneg_float",
            kl_estimator="kl_estimator",
            clip_eps_low="nonneg_float",
            clip_eps_high="nonneg_float",
            dual_clip="dual_clip",
            entropy_coef="real",
            loss_agg_mode="agg",
            is_weights="advantages",
            importance_sampling_level="is_level",
            kl_ratio_correction="bool",
            global_num_tokens="normalizer",
        ),
    ),
    "policy_loss(full kl, dr_grpo)": (
        _call(pf.policy_loss),
        lambda: dict(
            logps=-torch.rand(B, T, generator=_g()),
            old_logps=None,
            advantages=torch.randn(B, T, generator=_g()),
            kl=torch.rand(B, T, generator=_g()),
            kl_coef=0.1,
            kl_estimator="full",
            loss_agg_mode="seq-mean-token-sum-norm",
            max_length=T,
        ),
        dict(kl="bt", max_length="max_length"),
    ),
    "PolicyLoss()": (
        _ctor(pf.PolicyLoss),
        lambda: dict(
            kl_coef=0.1,
            kl_estimator="k3",
            loss_agg_mode="dr_grpo",
            max_length=4,
            importance_sampling_level="sequence",
            dual_clip=3.0,
            entropy_coef=0.01,
        ),
        dict(
            kl_coef="nonneg_float",
            kl_estimator="kl_estimator",
            max_length="max_length",
            importance_sampling_level="is_level",
            dual_clip="dual_clip",
            entropy_coef="real",
        ),
    ),
    "PolicyLoss.forward": (
        _module_call(pf.PolicyLoss, dict(kl_coef=0.1, entropy_coef=0.01)),
        lambda: dict(
            logps=-torch.rand(B, T, generator=_g()),
            old_logps=-torch.rand(B, T, generator=_g()),
            advantages=torch.randn(B, generator=_g()),
            mask=torch.ones(B, T, dtype=torch.bool),
            entropy=torch.rand(B, T, generator=_g()),
            ref_logps=-torch.rand(B, T, generator=_g()),
            is_weights=torch.ones(B, T),
            global_num_tokens=5.0,
        ),
        dict(
            logps="logps",
            old_logps="bt",
            advantages="advantages",
            mask="mask",
            entropy="bt",
            ref_logps="bt",
            is_weights="advantages",
            global_num_tokens="normalizer",
        ),
    ),
    "default_chunk_size": (
        _call(pfl.default_chunk_size),
        lambda: dict(num_tokens=6, vocab=V, dtype=torch.float32),
        dict(num_tokens="token_count", vocab="count", dtype="dtype"),
    ),
}
# the vocabulary-parallel options of the modules that touch the vocabulary, on a one-process group
FUNCS.update(
    {
        f"{cls.__name__}(vocab-parallel)": (
            _vocab_parallel(cls),
            lambda: dict(process_group="WORLD", vocab_start=0, vocab_size=V),
            dict(process_group="group", vocab_start="vocab_start_ctor", vocab_size="vocab_size_ctor"),
        )
        for cls in (
            pf.SequenceLogProbs,
            pf.LogitsDPOLoss,
            pf.PPOLoss,
            pfl.LinearSequenceLogProbs,
            pfl.LinearDPOLoss,
            pfl.LinearPPOLoss,
        )
    }
)


# ----------------------------------------------------------------------------- KINDS
# kind -> [(label, bad value from the valid value v and the valid arguments a, exception)]

META = torch.device("meta")


def _meta(v):
    return v.to(META)


def _strided_vocab(v):
    """Same shape, vocabulary stride 2: a transposed / sliced-vocabulary view."""
    return torch.randn(*v.shape[:-1], 2 * v.shape[-1], generator=_g())[..., ::2].to(v.dtype)


def _float_tensor_kinds(extra: List = ()) -> List:
    return [
        ("a list", lambda v, a: v.tolist(), TypeError),
        ("an integer tensor", lambda v, a: v.round().to(torch.int64), TypeError),
        ("on another device", lambda v, a: _meta(v), ValueError),
        *extra,
    ]


_LOGITS = _float_tensor_kinds(
    [
        ("0-d", lambda v, a: torch.tensor(1.0), ValueError),
        ("an empty vocabulary", lambda v, a: v[..., :0], ValueError),
        ("a vocabulary stride of 2", lambda v, a: _strided_vocab(v), ValueError),
        ("fewer rows than labels", lambda v, a: v[:1], ValueError),
        ("a bool tensor", lambda v, a: v > 0, TypeError),
    ]
)

KINDS: Dict[str, List[Tuple[str, Callable[[Any, dict], Any], type]]] = {
    "logits": _LOGITS,
    "logits_3d": _LOGITS + [("2-D", lambda v, a: v[0], ValueError)],
    "hidden": _float_tensor_kinds(
        [
            ("0-d", lambda v, a: torch.tensor(1.0), ValueError),
            ("a hidden size unlike weight's", lambda v, a: v[..., :-1], ValueError),
            ("another dtype than weight", lambda v, a: v.double(), TypeError),
        ]
    ),
    "hidden_3d": _float_tensor_kinds([("2-D", lambda v, a: v[0], ValueError)]),
    "weight": _float_tensor_kinds(
        [
            ("1-D", lambda v, a: v[0], ValueError),
            ("a hidden size unlike hidden's", lambda v, a: v[:, :-1], ValueError),
            ("another dtype than hidden", lambda v, a: v.double(), TypeError),
        ]
    ),
    "bias": _float_tensor_kinds(
        [
            ("V - 1 entries", lambda v, a: v[:-1], ValueError),
            ("another dtype than hidden", lambda v, a: v.double(), TypeError),
        ]
    ),
    "ref_logits": _float_tensor_kinds(
        [
            ("another shape", lambda v, a: v[:1], ValueError),
            ("another dtype", lambda v, a: v.double(), TypeError),
            ("a vocabulary stride of 2", lambda v, a: _strided_vocab(v), ValueError),
        ]
    ),
    "ref_logits_seq": _float_tensor_kinds(
        [
            ("another shape", lambda v, a: v[:, :1], ValueError),
        ]
    ),
    "labels": [
        ("a list", lambda v, a: v.tolist(), TypeError),
        ("a float tensor", lambda v, a: v.float(), TypeError),
        ("a bool tensor", lambda v, a: v > 0, TypeError),
        ("another shape", lambda v, a: v[..., :1], ValueError),
        ("one more dimension", lambda v, a: v.unsqueeze(-1), ValueError),
        ("on another device", lambda v, a: _meta(v), ValueError),
        ("a label == V", lambda v, a: v.clone().fill_(V), ValueError),
        ("a label < 0 that is not ignore_index", lambda v, a: v.clone().fill_(-5), ValueError),
    ],
    "packed_labels": [("2-D with cu_seqlens", lambda v, a: v.unsqueeze(0), ValueError)],
    "temperature": [
        ("a str", lambda v, a: "hot", TypeError),
        ("None", lambda v, a: None, TypeError),
        ("0", lambda v, a: 0.0, ValueError),
        ("-1", lambda v, a: -1.0, ValueError),
        ("nan", lambda v, a: math.nan, ValueError),
        ("inf", lambda v, a: math.inf, ValueError),
        ("an integer tensor", lambda v, a: torch.ones(1, dtype=torch.long), TypeError),
        ("a tensor with a 0", lambda v, a: torch.zeros(1), ValueError),
        ("a tensor of an unbroadcastable shape", lambda v, a: torch.ones(7), ValueError),
        ("a tensor on another device", lambda v, a: torch.ones(1, device=META), ValueError),
    ],
    "float_temperature": [
        ("a str", lambda v, a: "hot", TypeError),
        ("0", lambda v, a: 0.0, ValueError),
        ("nan", lambda v, a: math.nan, ValueError),
    ],
    "int": [
        ("a float", lambda v, a: -100.0, TypeError),
        ("a str", lambda v, a: "-100", TypeError),
        ("None", lambda v, a: None, TypeError),
        ("a bool", lambda v, a: True, TypeError),
    ],
    "reduction": [
        ("an unknown name", lambda v, a: "avg", ValueError),
        ("None", lambda v, a: None, TypeError),
    ],
    "bool": [
        ("a str", lambda v, a: "yes", TypeError),
        ("an int", lambda v, a: 1, TypeError),
        ("None", lambda v, a: None, TypeError),
    ],
    "stats": [
        ("an unknown name", lambda v, a: ("entropie",), ValueError),
        ("an int", lambda v, a: 5, TypeError),
    ],
    "backend": [
        ("an unknown name", lambda v, a: "nope", ValueError),
        ("an int", lambda v, a: 5, TypeError),
    ],
    "backend_ctor": [("an int", lambda v, a: 5, TypeError)],
    "vector": _float_tensor_kinds(
        [
            ("[B, 2]", lambda v, a: torch.stack([v.reshape(-1), v.reshape(-1)], 1), ValueError),
            ("B + 1 entries", lambda v, a: torch.cat([v.reshape(-1), v.reshape(-1)[:1]]), ValueError),
            ("0-d", lambda v, a: v.reshape(-1)[0], ValueError),
        ]
    ),
    "lengths": [
        ("a list", lambda v, a: v.tolist(), TypeError),
        ("a bool tensor", lambda v, a: v > 0, TypeError),
        ("B + 1 entries", lambda v, a: torch.cat([v, v[:1]]), ValueError),
        ("on another device", lambda v, a: _meta(v), ValueError),
    ],
    "pos_float": [
        ("0", lambda v, a: 0.0, ValueError),
        ("-1", lambda v, a: -1.0, ValueError),
        ("nan", lambda v, a: math.nan, ValueError),
        ("a str", lambda v, a: "0.1", TypeError),
        ("None", lambda v, a: None, TypeError),
    ],
    "opt_pos_float": [
        ("0", lambda v, a: 0.0, ValueError),
        ("a str", lambda v, a: "30", TypeError),
    ],
    "nonneg_float": [
        ("-1", lambda v, a: -1.0, ValueError),
        ("inf", lambda v, a: math.inf, ValueError),
        ("a str", lambda v, a: "0.1", TypeError),
    ],
    "real": [
        ("nan", lambda v, a: math.nan, ValueError),
        ("a str", lambda v, a: "0.1", TypeError),
    ],
    "smoothing": [
        ("0.5 for robust", lambda v, a: 0.5, ValueError),
        ("-0.1", lambda v, a: -0.1, ValueError),
        ("a str", lambda v, a: "0.1", TypeError),
    ],
    "dpo_loss_type": [
        ("an unknown name", lambda v, a: "sigmoidd", ValueError),
        ("an int", lambda v, a: 3, TypeError),
        ("an empty list", lambda v, a: [], ValueError),
    ],
    "cpo_loss_type": [
        ("an unknown name", lambda v, a: "dpo", ValueError),
        ("an int", lambda v, a: 3, TypeError),
    ],
    "dual_clip": [
        ("1.0 (must exceed 1)", lambda v, a: 1.0, ValueError),
        ("a str", lambda v, a: "3", TypeError),
    ],
    "f_divergence": [
        ("an unknown name", lambda v, a: "kl", ValueError),
        ("an int", lambda v, a: 3, TypeError),
    ],
    "kl_estimator": [
        ("an unknown name", lambda v, a: "k4", ValueError),
        ("an int", lambda v, a: 3, TypeError),
    ],
    "agg": [
        ("an unknown name", lambda v, a: "token-sum", ValueError),
        ("an int", lambda v, a: 3, TypeError),
    ],
    "is_level": [
        ("an unknown name", lambda v, a: "sentence", ValueError),
        ("an int", lambda v, a: 3, TypeError),
    ],
    "convention": [
        ("an unknown name", lambda v, a: "openrlhf", ValueError),
        ("an int", lambda v, a: 3, TypeError),
        ("the other trainer than loss_agg_mode's", lambda v, a: "trl", ValueError),
    ],
    "loss_type_args": [
        ("a list", lambda v, a: [1.0], TypeError),
        ("a key the loss type does not read", lambda v, a: {"sapo_temperature_pos": 1.0}, ValueError),
    ],
    "advantages": _float_tensor_kinds(
        [
            ("B + 1 entries", lambda v, a: torch.zeros(B + 1), ValueError),
            ("[B, T + 1]", lambda v, a: torch.zeros(B, T + 1), ValueError),
        ]
    ),
    "logps": [
        ("a list", lambda v, a: v.tolist(), TypeError),
        ("an integer tensor", lambda v, a: v.round().to(torch.int64), TypeError),
        ("[B * T] (1-D)", lambda v, a: v.reshape(-1), ValueError),
        ("[B, 0]", lambda v, a: v[:, :0], ValueError),
    ],
    "bt": _float_tensor_kinds(
        [
            ("[B, T + 1]", lambda v, a: torch.zeros(B, T + 1), ValueError),
            ("[B]", lambda v, a: torch.zeros(B), ValueError),
        ]
    ),
    "mask": [
        ("a list", lambda v, a: v.tolist(), TypeError),
        ("a complex tensor", lambda v, a: v.to(torch.complex64), TypeError),
        ("[B, T + 1]", lambda v, a: torch.ones(B, T + 1, dtype=torch.bool), ValueError),
        ("on another device", lambda v, a: _meta(v), ValueError),
    ],
    "margin": [
        ("a str", lambda v, a: "0.5", TypeError),
        ("nan", lambda v, a: math.nan, ValueError),
        ("a tensor of B + 1 entries", lambda v, a: torch.zeros(B + 1), ValueError),
        ("an integer tensor", lambda v, a: torch.zeros(B, dtype=torch.long), TypeError),
    ],
    "cu_seqlens": [
        ("a list", lambda v, a: v.tolist(), TypeError),
        ("a float tensor", lambda v, a: v.float(), TypeError),
        ("2-D", lambda v, a: v.unsqueeze(0), ValueError),
        ("not starting at 0", lambda v, a: torch.tensor([1, 2, 5]), ValueError),
        ("decreasing", lambda v, a: torch.tensor([0, 3, 2, 5]), ValueError),
        ("not ending at the number of tokens", lambda v, a: torch.tensor([0, 2, 4]), ValueError),
        ("a single entry", lambda v, a: torch.tensor([0]), ValueError),
        ("on another device", lambda v, a: _meta(v), ValueError),
    ],
    "chunk_size": [
        ("0", lambda v, a: 0, ValueError),
        ("-1", lambda v, a: -1, ValueError),
        ("a float", lambda v, a: 2.5, TypeError),
        ("a str", lambda v, a: "2", TypeError),
    ],
    "max_length": [
        ("0", lambda v, a: 0, ValueError),
        ("a str", lambda v, a: "3", TypeError),
        ("a float", lambda v, a: 3.5, TypeError),
    ],
    "loss_weights": [
        ("a float", lambda v, a: 1.0, TypeError),
        ("one weight for two types", lambda v, a: [1.0], ValueError),
        ("a nan weight", lambda v, a: [1.0, math.nan], ValueError),
        ("a str weight", lambda v, a: [1.0, "2"], TypeError),
    ],
    "bco_delta": [
        ("a str", lambda v, a: "0.1", TypeError),
        ("nan", lambda v, a: math.nan, ValueError),
        ("a tensor of 2 entries", lambda v, a: torch.zeros(2), ValueError),
        ("an integer tensor", lambda v, a: torch.tensor(1), TypeError),
        ("a tensor on another device", lambda v, a: torch.zeros((), device=META), ValueError),
    ],
    "smoothing_lt1": [
        ("1.0", lambda v, a: 1.0, ValueError),
        ("-0.1", lambda v, a: -0.1, ValueError),
        ("a str", lambda v, a: "0.1", TypeError),
    ],
    "nll_loss": [
        ("a float", lambda v, a: 1.5, TypeError),
        ("an integer tensor", lambda v, a: torch.tensor(1), TypeError),
        ("a tensor of 2 entries", lambda v, a: torch.ones(2), ValueError),
        ("on another device", lambda v, a: _meta(v), ValueError),
    ],
    "lora": [
        ("a pair", lambda v, a: v[:2], TypeError),
        ("A of another hidden size", lambda v, a: (v[0][:, :-1], v[1], v[2]), ValueError),
        ("B of another rank", lambda v, a: (v[0], v[1][:, :1], v[2]), ValueError),
        ("B of another dtype", lambda v, a: (v[0], v[1].double(), v[2]), TypeError),
        ("A on another device", lambda v, a: (_meta(v[0]), v[1], v[2]), ValueError),
        ("a str scaling", lambda v, a: (v[0], v[1], "0.5"), TypeError),
        ("a nan scaling", lambda v, a: (v[0], v[1], math.nan), ValueError),
        ("A not a tensor", lambda v, a: (v[0].tolist(), v[1], v[2]), TypeError),
    ],
    "ref_hidden": _float_tensor_kinds(
        [
            ("another number of tokens", lambda v, a: v[:1], ValueError),
            ("a hidden size unlike ref_weight's", lambda v, a: v[..., :-1], ValueError),
            ("another dtype than ref_weight", lambda v, a: v.double(), TypeError),
        ]
    ),
    "ref_weight": _float_tensor_kinds(
        [
            ("1-D", lambda v, a: v[0], ValueError),
            ("another vocabulary than weight", lambda v, a: v[:-1], ValueError),
            ("another dtype than ref_hidden", lambda v, a: v.double(), TypeError),
        ]
    ),
    "ref_bias": _float_tensor_kinds(
        [
            ("V - 1 entries", lambda v, a: v[:-1], ValueError),
            ("another dtype than ref_hidden", lambda v, a: v.double(), TypeError),
        ]
    ),
    "count": [
        ("0", lambda v, a: 0, ValueError),
        ("-1", lambda v, a: -1, ValueError),
        ("a float", lambda v, a: 6.5, TypeError),
        ("a str", lambda v, a: "6", TypeError),
    ],
    "group": [("a str", lambda v, a: "world", TypeError)],
    "vocab_start": [
        ("a str", lambda v, a: "0", TypeError),
        ("-1", lambda v, a: -1, ValueError),
        ("past the vocabulary", lambda v, a: 3, ValueError),
    ],
    "vocab_size": [
        ("a float", lambda v, a: float(V), TypeError),
        ("V + 1", lambda v, a: V + 1, ValueError),
    ],
    # a module's constructor checks what it can alone; the layout (shards tiling the
    # vocabulary) needs the group's shards and is checked by every call
    "vocab_start_ctor": [
        ("a str", lambda v, a: "0", TypeError),
        ("-1", lambda v, a: -1, ValueError),
    ],
    "vocab_start_no_group": [("0 without process_group", lambda v, a: 0, ValueError)],
    "vocab_size_ctor": [
        ("a float", lambda v, a: float(V), TypeError),
        ("0", lambda v, a: 0, ValueError),
    ],
    "bco_delta_ctor": [
        ("a str", lambda v, a: "0.1", TypeError),
        ("nan", lambda v, a: math.nan, ValueError),
        ("a tensor", lambda v, a: torch.tensor(0.1), TypeError),
    ],
    "token_count": [  # 0 tokens is an empty batch, valid
        ("-1", lambda v, a: -1, ValueError),
        ("a float", lambda v, a: 6.5, TypeError),
        ("a str", lambda v, a: "6", TypeError),
    ],
    "dtype": [
        ("an int dtype", lambda v, a: torch.int64, ValueError),
        ("a str", lambda v, a: "float32", TypeError),
    ],
    "normalizer": [
        ("0", lambda v, a: 0.0, ValueError),
        ("a str", lambda v, a: "12", TypeError),
        ("a tensor of 2 entries", lambda v, a: torch.ones(2), ValueError),
    ],
}


# ------------------------------------------------------------------------ the matrix


def _cells():
    for fname, (_, _, args) in FUNCS.items():
        for arg, kind in args.items():
            for label, _, exc in KINDS[kind]:
                yield fname, arg, label, exc


CELLS = list(_cells())

# (function, argument, label) -> why the package does not meet the expectation yet
KNOWN_GAPS: Dict[Tuple[str, str, str], str] = {}


def _tensors(obj, out):
    if isinstance(obj, torch.Tensor):
        out.append(obj)
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            _tensors(o, out)
    elif isinstance(obj, dict):
        for o in obj.values():
            _tensors(o, out)
    return out


def _bits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().reshape(-1).clone()
    return t.view(torch.uint8) if t.dtype != torch.bool else t


def _named(msg: str, arg: str) -> bool:
    # the argument's name as a word; "lora A" style names and dotted ones too
    return re.search(rf"(?<![A-Za-z_]){re.escape(arg)}(?![A-Za-z_])", msg) is not None


EXPECTS = re.compile(r"\b(must|expected|needs?|required|only|valid)\b")


@pytest.mark.parametrize(
    "fname, arg, label, exc",
    [
        pytest.param(
            *c,
            id=f"{c[0]}-{c[1]}-{c[2]}",
            marks=[pytest.mark.xfail(strict=True, reason=KNOWN_GAPS[c[:3]])] if c[:3] in KNOWN_GAPS else [],
        )
        for c in CELLS
    ],
)
def test_bad_argument(fname, arg, label, exc):
    call, valid, kinds = FUNCS[fname]
    args = valid()
    bad = next(g for lab, g, _ in KINDS[kinds[arg]] if lab == label)
    args[arg] = bad(args.get(arg), args)
    before = [(t, _bits(t)) for t in _tensors(args, []) if t.device.type != "meta"]
    with pytest.raises(Exception) as info:
        call(args)
    err = info.value
    assert type(err) is exc, f"{fname}({arg}={label}): expected {exc.__name__}, got {type(err).__name__}: {err}"
    msg = str(err)
    assert _named(msg, arg), f"{fname}({arg}={label}): the message does not name {arg!r}: {msg}"
    assert EXPECTS.search(msg), f"{fname}({arg}={label}): the message does not say what was expected: {msg}"
    for t, b in before:
        assert torch.equal(_bits(t), b), f"{fname}({arg}={label}): an input tensor was modified by the rejected call"


@pytest.mark.parametrize("fname", list(FUNCS))
def test_valid_arguments_are_accepted(fname):
    """Each row's valid arguments pass, so a cell's error comes from its one bad argument."""
    call, valid, _ = FUNCS[fname]
    call(valid())


def test_every_public_function_is_in_the_matrix():
    """A new public function must get a row in FUNCS, a new public module a constructor row
    ("Name(...)") and a forward row ("Name(...).forward")."""
    covered = {name.split("(")[0] for name in FUNCS}
    names = [(pf, n) for n in pf.__all__] + [(pfl, n) for n in pfl.__all__]
    public = {n for m, n in names if callable(getattr(m, n)) and n[0].islower()}
    public -= {"available_backends", "build_info"}  # no arguments
    assert public <= covered, f"public functions missing from the bad-input matrix: {sorted(public - covered)}"
    modules = {n for m, n in names if isinstance(getattr(m, n), type) and issubclass(getattr(m, n), torch.nn.Module)}
    ctors = {name.split("(")[0] for name in FUNCS if name.endswith(")") and name[0].isupper()}
    forwards = {name.split("(")[0].split(".")[0] for name in FUNCS if name.endswith(".forward")}
    assert modules <= ctors, f"modules without a constructor row: {sorted(modules - ctors)}"
    assert modules <= forwards, f"modules without a forward row: {sorted(modules - forwards)}"


# module -> (its function, and the function its extra keywords go to)
MODULE_FUNCTIONS = {
    "SequenceLogProbs": (pf.sequence_logprobs,),
    "DPOLoss": (pf.dpo_loss,),
    "LogitsDPOLoss": (pf.logits_dpo_loss, pf.dpo_loss),
    "BradleyTerryLoss": (pf.bradley_terry_loss,),
    "PPOLoss": (pf.ppo_loss,),
    "LinearSequenceLogProbs": (pfl.linear_sequence_logprobs,),
    "LinearDPOLoss": (pfl.linear_dpo_loss, pf.dpo_loss),
    "LinearPPOLoss": (pfl.linear_ppo_loss,),
    "LinearCPOLoss": (pfl.linear_cpo_loss,),
    "LinearSimPOLoss": (pfl.linear_simpo_loss,),
    "LinearORPOLoss": (pfl.linear_orpo_loss,),
    "PolicyLoss": (pf.policy_loss,),
}
# inputs of dpo_loss that the DPO modules over logits / hidden states compute themselves
_PAIR_LOGPS = {
    "chosen_logps",
    "rejected_logps",
    "ref_chosen_logps",
    "ref_rejected_logps",
    "chosen_lengths",
    "rejected_lengths",
}
# options only a module has, and why
MODULE_ONLY = {"bco_running_mean": "state across calls (the BCO running mean), which a function cannot keep"}


def _keywords(fn) -> Dict[str, inspect.Parameter]:
    skip = (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)
    return {n: p for n, p in inspect.signature(fn).parameters.items() if p.kind not in skip and n != "self"}


def _init_keywords(cls) -> Dict[str, inspect.Parameter]:
    """The keywords ``cls(...)`` accepts: its __init__'s, and its bases' through ``**kwargs``."""
    out: Dict[str, inspect.Parameter] = {}
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        sig = inspect.signature(klass.__init__)
        for n, p in _keywords(klass.__init__).items():
            out.setdefault(n, p)
        if not any(p.kind == inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values()):
            break
    return out


@pytest.mark.parametrize("module", list(MODULE_FUNCTIONS))
def test_module_takes_every_option_of_its_function(module):
    """Every keyword of the function that is a configuration option (not a tensor input of the
    module's forward, nor one the module computes) is a constructor keyword of the module, with
    the same default; and the module has no option its function lacks (but MODULE_ONLY)."""
    cls = getattr(pf, module)
    fns = MODULE_FUNCTIONS[module]
    inputs = set(_keywords(cls.forward)) | (_PAIR_LOGPS if len(fns) > 1 else set())
    options: Dict[str, inspect.Parameter] = {}
    for fn in fns:
        for n, p in _keywords(fn).items():
            if n not in inputs:
                options.setdefault(n, p)
    init = _init_keywords(cls)
    missing = sorted(set(options) - set(init))
    assert not missing, f"{module}(...) lacks options of {fns[0].__name__}: {missing}"
    extra = sorted(set(init) - set(options) - set(MODULE_ONLY))
    assert not extra, f"{module}(...) has options its function {fns[0].__name__} lacks: {extra}"
    defaults = {n: (options[n].default, init[n].default) for n in options if options[n].default != init[n].default}
    assert not defaults, f"{module}: defaults differ from {fns[0].__name__}'s (function, module): {defaults}"


def test_every_public_module_has_its_function():
    modules = {
        n for n in pf.__all__ if isinstance(getattr(pf, n), type) and issubclass(getattr(pf, n), torch.nn.Module)
    }
    assert modules == set(MODULE_FUNCTIONS), (
        f"MODULE_FUNCTIONS is out of date: {sorted(modules ^ set(MODULE_FUNCTIONS))}"
    )


def test_matrix_size():
    assert len(CELLS) > 600


# ----------------------------------------------------------- rejected backward calls


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton", "cuda"], indirect=True)
def test_inplace_backward_on_overlapping_rows_leaves_logits_untouched(backend, device):
    """An expand()ed buffer cannot take an in-place gradient (its rows share memory): the
    call must fail with a clear error and leave the buffer as it was."""
    base = torch.randn(1, 37, device=device, requires_grad=True)
    buf = base * 1.0
    logits = buf.expand(4, 37)
    y = torch.randint(0, 37, (4,), device=device)
    snapshot = _bits(buf)
    with pytest.raises((ValueError, RuntimeError), match="overlap|memory location|in-place|inplace"):
        out = pf.token_logprobs(logits, y, inplace_backward=True, backend=backend)
        out.sum().backward()
    assert torch.equal(_bits(buf), snapshot), "the logits buffer was (partially) written"


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton", "cuda"], indirect=True)
def test_logits_modified_between_forward_and_inplace_backward(backend, device):
    """Autograd's version counter catches logits changed after the forward: the backward
    raises before the kernel runs, so it writes nothing."""
    base = torch.randn(3, 29, device=device, requires_grad=True)
    buf = base * 1.0
    y = torch.randint(0, 29, (3,), device=device)
    out = pf.token_logprobs(buf, y, inplace_backward=True, backend=backend)
    with torch.no_grad():
        buf.mul_(2.0)
    snapshot = _bits(buf)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()
    assert torch.equal(_bits(buf), snapshot)


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton", "cuda"], indirect=True)
def test_second_backward_after_inplace_backward_is_refused(backend, device):
    """After an in-place backward the logits hold the gradient: a second backward must not
    silently differentiate through the overwritten values (the version counter refuses)."""
    buf = torch.randn(3, 29, device=device, requires_grad=True) * 1.0
    y = torch.randint(0, 29, (3,), device=device)
    out = pf.token_logprobs(buf, y, inplace_backward=True, backend=backend)
    out.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


def test_ambiguous_sharded_head_layout_is_refused(one_process_group):
    """A DTensor lm_head with a DTensor hidden that is neither replicated on its mesh (tensor
    parallel) nor plain (FSDP2's data parallel) states no layout: refused, naming both."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import distribute_tensor
    from torch.distributed.tensor.placement_types import Replicate, Shard

    mesh = init_device_mesh("cpu", (1,))
    w = distribute_tensor(torch.randn(11, 4), mesh, [Shard(0)])
    y = torch.zeros(3, dtype=torch.long)
    for fn in (pfl.linear_token_logprobs, pfl.linear_sequence_logprobs):
        h = distribute_tensor(torch.randn(3, 4), mesh, [Shard(0)])  # rows split: which layout?
        with pytest.raises(ValueError, match="state the layout.*Tensor \\(vocabulary\\) parallel.*Data parallel"):
            fn(h, w, y)
    # the two stated layouts run (one rank: both equal the one-device result)
    h0 = torch.randn(3, 4)
    want = pfl.linear_token_logprobs(h0, w.full_tensor(), y)
    torch.testing.assert_close(pfl.linear_token_logprobs(h0, w, y), want)  # plain hidden: data parallel
    hr = distribute_tensor(h0, mesh, [Replicate()])
    torch.testing.assert_close(pfl.linear_token_logprobs(hr, w, y), want)  # replicated: tensor parallel


def test_sharded_head_on_a_2d_mesh_is_refused(one_process_group):
    """HSDP (a 2-D mesh: replicate x shard) is not supported for the data-parallel sharded head yet:
    a clear error, not an answer averaged over the wrong ranks."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import distribute_tensor
    from torch.distributed.tensor.placement_types import Replicate, Shard

    mesh = init_device_mesh("cpu", (1, 1), mesh_dim_names=("replicate", "shard"))
    w = distribute_tensor(torch.randn(11, 4), mesh, [Replicate(), Shard(0)])
    with pytest.raises(ValueError, match="2-D mesh.*supported on a 1-D mesh"):
        pfl.linear_token_logprobs(torch.randn(3, 4), w, torch.zeros(3, dtype=torch.long))
