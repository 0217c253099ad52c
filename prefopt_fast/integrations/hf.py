"""Hugging Face causal LMs (plain or PEFT) for the fused-linear losses: hidden states and the lm_head, no logits.

For custom training loops::

    from prefopt_fast.integrations import hf
    import prefopt_fast as pf

    hidden, head = hf.hidden_and_head(model, input_ids=ids, attention_mask=am)   # [B, T, H], LMHead
    labels = hf.shift_labels(ids, completion_mask)                               # [B, T], -100 elsewhere
    ref_c, ref_r = hf.reference_sequence_logprobs(model, ids, completion_mask, attention_mask=am).chunk(2)
    loss, metrics = pf.linear_dpo_loss(hidden, head.weight, labels, **head.kwargs(),
                                       ref_chosen_logps=ref_c, ref_rejected_logps=ref_r, beta=0.1)

What is covered:

* any ``*ForCausalLM`` whose backbone is its ``base_model_prefix`` attribute (``model.model``
  for Llama, Qwen, Mistral, Gemma, ...) or ``get_decoder()``, and whose output embedding is
  an ``nn.Linear``; the backbone is called directly, so the ``[B, T, V]`` logits are never
  computed;
* PEFT: LoRA adapters inside the backbone act as usual; LoRA on the lm_head itself comes
  back as ``LMHead.lora = (A [r, H], B [V, r], scaling)`` (one active adapter, plain LoRA,
  no dropout while training, no LoRA bias); ``modules_to_save=["lm_head"]`` gives the
  active copy; prompt-learning adapters (prefix / prompt tuning) are refused (they run in
  ``PeftModel.forward``, which this bypasses);
* the logit transforms models declare in their config: ``final_logit_softcapping``
  (Gemma 2/3), ``logit_scale`` (Cohere), ``output_multiplier``, ``lm_head_multiplier``
  (Falcon-H1), ``logits_scaling`` (Granite / MiniCPM3 divide by it, HyperCLOVA X multiplies);
* reference log-probs from the same PEFT model with its adapters disabled
  (:func:`adapters_disabled`, :func:`reference_sequence_logprobs`);
* sharded heads (:func:`gathered_lm_head`): a DeepSpeed ZeRO-3 head read inside the forward
  of the module ``deepspeed.initialize`` wrapped is gathered by DeepSpeed (forward and
  backward; the loss belongs in that forward); under ``no_grad`` a partitioned one is
  gathered with ``deepspeed.zero.GatheredParameters`` for the ``with`` block; FSDP2 / DTensor
  parameters are all-gathered (``distributed.gather_parameter``: differentiable, the gradient
  goes back to this rank's shard averaged over the ranks, as FSDP2 delivers it). The
  ``linear_*`` functions do the same by themselves for a DTensor weight with plain hidden
  states; a head that is vocabulary-parallel on purpose (tensor parallel, every rank holding
  the same tokens) takes hidden states replicated on its mesh, or ``process_group=``.

Not covered: models wrapped in ``DistributedDataParallel`` / ``DataParallel`` (their gradient
synchronisation is armed by their own ``forward``, which calling the backbone bypasses: put
the loss computation inside the forward of a module and wrap that module), and heads that are
not a linear layer.
"""

import contextlib
from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor, nn

from ..distributed import gather_parameter
from . import _zero3

__all__ = [
    "LMHead",
    "unwrap_causal_lm",
    "get_backbone",
    "get_lm_head",
    "logit_transform",
    "get_hidden_states",
    "hidden_and_head",
    "shift_labels",
    "gathered_lm_head",
    "adapters_disabled",
    "sequence_logprobs",
    "reference_sequence_logprobs",
]


class LMHead(NamedTuple):
    """The lm_head of a causal LM as the fused-linear API takes it.

    ``weight`` ``[V, H]``, ``bias`` ``[V]`` or None, ``lora`` ``(A [r, H], B [V, r], scaling)``
    or None, ``logit_scale`` and ``softcap`` from the model config. The tensors are the
    model's parameters themselves (gradients flow to them).
    """

    weight: Tensor
    bias: Optional[Tensor] = None
    lora: Optional[Tuple[Tensor, Tensor, float]] = None
    logit_scale: float = 1.0
    softcap: Optional[float] = None

    def kwargs(self) -> dict:
        """``bias``, ``lora``, ``logit_scale``, ``softcap`` for ``linear_token_logprobs`` and the linear losses."""
        return dict(bias=self.bias, lora=self.lora, logit_scale=self.logit_scale, softcap=self.softcap)

    def to(self, dtype: torch.dtype) -> "LMHead":
        """The head with every tensor cast to ``dtype`` (a differentiable cast; no copy when already there)."""
        lora = None if self.lora is None else (self.lora[0].to(dtype), self.lora[1].to(dtype), self.lora[2])
        return self._replace(
            weight=self.weight.to(dtype), bias=None if self.bias is None else self.bias.to(dtype), lora=lora
        )

    @property
    def dtypes(self) -> set:
        ts = [self.weight, self.bias] + ([] if self.lora is None else list(self.lora[:2]))
        return {t.dtype for t in ts if t is not None}


# --------------------------------------------------------------------------- model structure


def _is_peft_model(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def unwrap_causal_lm(model: nn.Module) -> nn.Module:
    """The ``*ForCausalLM`` inside ``model`` (a PEFT model's base model, with its adapters injected).

    Raises for DDP / DataParallel wrappers and prompt-learning PEFT models (see the module docstring).
    """
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        raise TypeError(
            f"model is wrapped in {type(model).__name__}, whose gradient synchronisation is armed by its own forward; "
            "calling the backbone directly would bypass it. Compute the loss inside the forward of an nn.Module "
            "(which calls these helpers on the unwrapped model) and wrap that module instead"
        )
    if _is_peft_model(model):
        if getattr(model, "_is_prompt_learning", False):
            raise TypeError(
                "prompt-learning PEFT adapters (prefix / prompt / p-tuning) add virtual tokens in "
                "PeftModel.forward, which these helpers bypass; only LoRA-style adapters are supported"
            )
        model = model.get_base_model()
    return model


def get_backbone(model: nn.Module) -> nn.Module:
    """The decoder stack of a causal LM: what produces the last hidden states, final norm included."""
    lm = unwrap_causal_lm(model)
    backbone = None
    prefix = getattr(lm, "base_model_prefix", None)
    if prefix:
        backbone = getattr(lm, prefix, None)
    if (backbone is None or backbone is lm) and hasattr(lm, "get_decoder"):
        try:
            backbone = lm.get_decoder()
        except (AttributeError, NotImplementedError):
            backbone = None
    if not isinstance(backbone, nn.Module) or backbone is lm:
        raise TypeError(
            f"cannot find the backbone of {type(lm).__name__}: expected its base_model_prefix "
            f"attribute ({prefix!r}) or get_decoder() to return the decoder stack"
        )
    return backbone


def _config_value(config, name):
    v = getattr(config, name, None)
    return None if v is None else float(v)


def logit_transform(model: nn.Module) -> Tuple[float, Optional[float]]:
    """``(logit_scale, softcap)`` the model applies to ``lm_head(hidden)`` (1.0 and None for most models)."""
    lm = unwrap_causal_lm(model)
    config = lm.config
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    softcap = _config_value(config, "final_logit_softcapping")
    scale = None
    for name in ("logit_scale", "output_multiplier", "lm_head_multiplier"):
        scale = _config_value(config, name)
        if scale is not None:
            break
    if scale is None:
        div = _config_value(config, "logits_scaling")
        if div is not None:
            # Granite / MiniCPM3 divide the logits by it, HyperCLOVA X multiplies them
            scale = div if getattr(config, "model_type", None) == "hyperclovax" else 1.0 / div
    return (1.0 if scale is None else scale), softcap


def _lora_of(layer, name: str):
    """(A, B, scaling) of adapter ``name`` of a peft LoRA layer, after checking it is plain LoRA."""
    if name in getattr(layer, "lora_variant", {}):
        raise TypeError(
            f"lm_head adapter {name!r} is a LoRA variant ({type(layer.lora_variant[name]).__name__}, "
            "e.g. DoRA): only plain LoRA on the head is supported"
        )
    a, b = layer.lora_A[name], layer.lora_B[name]
    if not isinstance(a, nn.Linear) or not isinstance(b, nn.Linear):
        raise TypeError(f"lm_head adapter {name!r}: expected nn.Linear LoRA factors; got {type(a).__name__}")
    if getattr(b, "bias", None) is not None:
        raise TypeError(f"lm_head adapter {name!r} has a LoRA bias (lora_bias=True), which is not supported")
    drop = layer.lora_dropout[name]
    if isinstance(drop, nn.Dropout) and drop.p > 0 and drop.training:
        raise ValueError(
            f"lm_head adapter {name!r} has lora_dropout={drop.p} in training mode: the dropped inputs "
            "of the LoRA branch cannot be expressed as (A, B, scaling) on the same hidden states; use "
            "lora_dropout=0 for the head, or call model.eval()"
        )
    scaling = layer.scaling[name]
    if isinstance(scaling, Tensor):
        scaling = float(scaling)
    return a.weight, b.weight, float(scaling)


def get_lm_head(model: nn.Module) -> LMHead:
    """The lm_head of a causal LM (plain or PEFT-wrapped) as an :class:`LMHead`, with the config's logit transform."""
    lm = unwrap_causal_lm(model)
    head = lm.get_output_embeddings()
    if head is None:
        raise TypeError(f"{type(lm).__name__} has no output embeddings (get_output_embeddings() is None)")
    lora = None
    try:
        from peft.tuners.lora import LoraLayer
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.utils.other import ModulesToSaveWrapper
    except ImportError:
        LoraLayer = BaseTunerLayer = ModulesToSaveWrapper = ()  # noqa: N806
    if ModulesToSaveWrapper and isinstance(head, ModulesToSaveWrapper):
        active = [] if head.disable_adapters else list(head.active_adapters)
        head = head.original_module if not active else head.modules_to_save[active[0]]
    elif BaseTunerLayer and isinstance(head, BaseTunerLayer):
        if not isinstance(head, LoraLayer):
            raise TypeError(f"lm_head carries a {type(head).__name__} PEFT adapter: only LoRA is supported on the head")
        base = head.get_base_layer()
        if not head.disable_adapters and not head.merged:
            names = [n for n in head.active_adapters if n in head.lora_A]
            if len(names) > 1:
                raise ValueError(f"lm_head has several active LoRA adapters {names}: only one is supported")
            if names:
                lora = _lora_of(head, names[0])
        head = base
    if not isinstance(head, nn.Linear):
        raise TypeError(
            f"the lm_head of {type(lm).__name__} is a {type(head).__name__}, not an nn.Linear: its "
            "forward may do more than a projection, which the fused-linear kernels would not reproduce"
        )
    if head.weight.device.type == "meta":
        raise ValueError("the lm_head weight is on the meta device (offloaded with accelerate hooks?): load it first")
    scale, softcap = logit_transform(lm)
    return LMHead(head.weight, head.bias, lora, scale, softcap)


# --------------------------------------------------------------------------- forward


def get_hidden_states(
    model: nn.Module, input_ids: Optional[Tensor] = None, attention_mask: Optional[Tensor] = None, **model_kwargs
) -> Tensor:
    """Last hidden states ``[B, T, H]`` of a causal LM (final norm applied), without the lm_head.

    ``model_kwargs`` go to the backbone (``position_ids``, ``inputs_embeds``, ...); ``use_cache``
    defaults to False. The result is on the lm_head's device.
    """
    backbone = get_backbone(model)
    model_kwargs.setdefault("use_cache", False)
    out = backbone(input_ids=input_ids, attention_mask=attention_mask, **model_kwargs)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    head = unwrap_causal_lm(model).get_output_embeddings()
    w = getattr(head, "weight", None)
    if isinstance(w, Tensor) and w.device != hidden.device and w.device.type != "meta":
        hidden = hidden.to(w.device)  # a model split across devices (device_map) can end elsewhere
    return hidden


def hidden_and_head(
    model: nn.Module,
    input_ids: Optional[Tensor] = None,
    attention_mask: Optional[Tensor] = None,
    *,
    dtype: Optional[torch.dtype] = None,
    **model_kwargs,
) -> Tuple[Tensor, LMHead]:
    """``(hidden [B, T, H], LMHead)`` in one dtype, ready for ``linear_token_logprobs(hidden, head.weight, labels,
    **head.kwargs())`` and the linear losses.

    ``dtype``: the compute dtype of the head; default: the hidden states' dtype when the head's
    tensors differ from it (e.g. fp32 LoRA factors on a bf16 model, as PEFT makes them), else
    unchanged. Casts are differentiable (gradients come back in each parameter's dtype).
    """
    hidden = get_hidden_states(model, input_ids, attention_mask, **model_kwargs)
    head = get_lm_head(model)
    target = dtype if dtype is not None else hidden.dtype
    if head.dtypes != {target}:
        head = head.to(target)
    if hidden.dtype != target:
        hidden = hidden.to(target)
    return hidden, head


def shift_labels(input_ids: Tensor, loss_mask: Optional[Tensor] = None, ignore_index: int = -100) -> Tensor:
    """Labels aligned with the hidden states: position t scores token t + 1.

    ``loss_mask`` ``[B, T]`` (bool or 0/1) marks the tokens to score (e.g. the completion);
    position t is kept when token t + 1 is. The last position is always ``ignore_index``.
    """
    labels = torch.full_like(input_ids, ignore_index)
    labels[..., :-1] = input_ids[..., 1:]
    if loss_mask is not None:
        if loss_mask.shape != input_ids.shape:
            raise ValueError(
                f"loss_mask must have the shape of input_ids {list(input_ids.shape)}; got {list(loss_mask.shape)}"
            )
        keep = torch.zeros_like(input_ids, dtype=torch.bool)
        keep[..., :-1] = loss_mask[..., 1:].bool()
        labels = labels.masked_fill(~keep, ignore_index)
    return labels


# --------------------------------------------------------------------------- sharded heads


def _full(t):
    # not DTensor.full_tensor(): its backward hands each rank only its own tokens' part of the
    # gradient; gather_parameter returns the gradient averaged over the ranks, as FSDP2 does
    return gather_parameter(t, "lm_head parameter")


@contextlib.contextmanager
def gathered_lm_head(head: LMHead):
    """Context manager yielding ``head`` with whole tensors: ZeRO-3 gathered, DTensors made full.

    DeepSpeed ZeRO-3 partitions parameters to empty tensors outside the forward that uses
    them. Read inside the forward of the module ``deepspeed.initialize`` wrapped (where the
    loss must be computed), the head is gathered by DeepSpeed itself, for the forward and
    again for the backward, which may run after the block. A partitioned head is gathered
    (``deepspeed.zero.GatheredParameters``, read-only) until the block exits when no gradient
    can reach it (a reference under ``no_grad``), and refused (``RuntimeError``) when one
    would (:mod:`prefopt_fast.integrations._zero3`). FSDP2 DTensor parameters are
    all-gathered (its backward hands each rank its shard of the gradient averaged over the
    ranks, as FSDP2's own reduce-scatter does). Plain tensors pass through unchanged, at no cost.
    """
    tensors = [head.weight, head.bias] + ([] if head.lora is None else list(head.lora[:2]))
    with _zero3.gathered(*tensors):
        lora = None if head.lora is None else (_full(head.lora[0]), _full(head.lora[1]), head.lora[2])
        yield head._replace(weight=_full(head.weight), bias=None if head.bias is None else _full(head.bias), lora=lora)


# --------------------------------------------------------------------------- references


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """Context manager: a PEFT model runs as its base model inside (the frozen reference of LoRA training)."""
    if not _is_peft_model(model):
        raise TypeError(
            f"adapters_disabled needs a peft.PeftModel; got {type(model).__name__} (pass a separate "
            "reference model instead)"
        )
    with model.disable_adapter():
        yield model


def sequence_logprobs(
    model: nn.Module,
    input_ids: Tensor,
    loss_mask: Tensor,
    *,
    attention_mask: Optional[Tensor] = None,
    temperature: float = 1.0,
    average: bool = False,
    chunk_size: Optional[int] = None,
    dtype: Optional[torch.dtype] = None,
    **model_kwargs,
) -> Tensor:
    """Per-sequence log-probs ``[B]`` (fp32) of the tokens ``loss_mask`` marks, from the hidden states.

    Sum over the marked tokens (mean with ``average``); differentiable, through
    :func:`prefopt_fast.linear_sequence_logprobs` (the logits are never built). ``loss_mask``
    ``[B, T]`` marks the scored tokens of ``input_ids`` (the first token can never be scored).
    A ZeRO-3 head: as :func:`gathered_lm_head` (call it inside the engine's forward to train).
    """
    from ..ops.linear_logprobs import linear_sequence_logprobs

    hidden, head = hidden_and_head(model, input_ids, attention_mask, dtype=dtype, **model_kwargs)
    labels = shift_labels(input_ids, loss_mask).to(hidden.device)
    with gathered_lm_head(head) as h:
        return linear_sequence_logprobs(
            hidden, h.weight, labels, temperature=temperature, average=average, chunk_size=chunk_size, **h.kwargs()
        )


def reference_sequence_logprobs(
    model: nn.Module,
    input_ids: Tensor,
    loss_mask: Tensor,
    *,
    ref_model: Optional[nn.Module] = None,
    attention_mask: Optional[Tensor] = None,
    temperature: float = 1.0,
    average: bool = False,
    chunk_size: Optional[int] = None,
    dtype: Optional[torch.dtype] = None,
    **model_kwargs,
) -> Tensor:
    """Reference per-sequence log-probs ``[B]`` under ``no_grad``: ``ref_model`` if given, else ``model``
    (a PEFT model) with its adapters disabled. Arguments as :func:`sequence_logprobs`."""
    with torch.no_grad():
        if ref_model is not None:
            return sequence_logprobs(
                ref_model,
                input_ids,
                loss_mask,
                attention_mask=attention_mask,
                temperature=temperature,
                average=average,
                chunk_size=chunk_size,
                dtype=dtype,
                **model_kwargs,
            )
        with adapters_disabled(model):
            return sequence_logprobs(
                model,
                input_ids,
                loss_mask,
                attention_mask=attention_mask,
                temperature=temperature,
                average=average,
                chunk_size=chunk_size,
                dtype=dtype,
                **model_kwargs,
            )
