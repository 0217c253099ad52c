"""DPO in a plain PyTorch loop with prefopt_fast's functional API: no trainer, no logits.

The policy is a tiny Llama (built from a config, no download) with a LoRA adapter (PEFT)
on the attention projections and on the lm_head; the reference is the same model with the
adapter disabled. Each step:

    hidden, head = hf.hidden_and_head(model, ids, attention_mask)      # [2B, T, H] + lm_head, no logits
    ref = hf.reference_sequence_logprobs(model, ids, completion_mask, attention_mask=...)  # adapters off
    loss, metrics = linear_dpo_loss(hidden, head.weight, labels, **head.kwargs(), ...)

The [2B, T, V] logits are never built: linear_dpo_loss streams the lm_head (and its LoRA
factors) over vocabulary tiles. Token ids are made directly: chosen completions use even
ids, rejected ones odd ids.

    python examples/custom_loop_dpo.py             # 40 steps
    python examples/custom_loop_dpo.py --steps 3   # (or PREFOPT_EXAMPLE_STEPS=3) what CI runs

Needs: transformers; peft for the LoRA policy (without it: full fine-tuning against a frozen copy).
"""

import argparse
import copy
import os
import time

import torch

VOCAB = 1000


def make_batch(g: torch.Generator, pairs: int, prompt_len: int = 4, max_completion: int = 4):
    """The stacked [chosen; rejected] batch: input_ids, attention_mask, completion_mask, all [2 * pairs, T].

    Right-padded with id 0; each pair shares its prompt.
    """
    T = prompt_len + max_completion
    ids = torch.zeros(2 * pairs, T, dtype=torch.long)
    attention = torch.zeros_like(ids)
    completion = torch.zeros_like(ids)
    for i in range(pairs):
        prompt = torch.randint(3, VOCAB, (prompt_len,), generator=g)
        for row, parity in ((i, 0), (pairs + i, 1)):
            k = int(torch.randint(2, max_completion + 1, (1,), generator=g))
            answer = 2 * torch.randint(2, VOCAB // 2, (k,), generator=g) + parity
            ids[row, :prompt_len] = prompt
            ids[row, prompt_len : prompt_len + k] = answer
            attention[row, : prompt_len + k] = 1
            completion[row, prompt_len : prompt_len + k] = 1
    return ids, attention, completion


def build_policy(use_peft: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
    )
    model = LlamaForCausalLM(cfg)
    if not use_peft:
        return model, copy.deepcopy(model).eval().requires_grad_(False)
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "lm_head"]
    )
    return get_peft_model(model, lora), None  # reference: the adapter disabled


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=int(os.environ.get("PREFOPT_EXAMPLE_STEPS", 40)))
    p.add_argument("--pairs", type=int, default=8)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--beta", type=float, default=0.5)
    p.add_argument("--loss-type", default="sigmoid")
    p.add_argument("--no-peft", action="store_true", help="full fine-tuning against a frozen copy")
    args = p.parse_args(argv)

    import prefopt_fast  # noqa: F401  (the package; the pieces below are its modules)
    from prefopt_fast.integrations import hf
    from prefopt_fast.linear import linear_dpo_loss

    use_peft = not args.no_peft
    if use_peft:
        try:
            import peft  # noqa: F401
        except ImportError:
            print("peft not installed: full fine-tuning against a frozen copy instead of LoRA")
            use_peft = False
    model, ref_model = build_policy(use_peft)
    model.train()
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=args.lr)
    g = torch.Generator().manual_seed(0)
    data = [make_batch(g, args.pairs) for _ in range(4)]  # a small fixed set, revisited every 4 steps

    t0 = time.time()
    for step in range(1, args.steps + 1):
        ids, attention, completion = data[(step - 1) % len(data)]
        # reference log-probs: no grad; the same PEFT model with its adapter off (or the frozen copy)
        ref = hf.reference_sequence_logprobs(model, ids, completion, ref_model=ref_model, attention_mask=attention)
        ref_chosen, ref_rejected = ref.chunk(2)

        hidden, head = hf.hidden_and_head(model, ids, attention)  # no logits
        labels = hf.shift_labels(ids, completion)  # position t scores token t + 1
        loss, metrics = linear_dpo_loss(
            hidden,
            head.weight,
            labels,
            **head.kwargs(),
            ref_chosen_logps=ref_chosen,
            ref_rejected_logps=ref_rejected,
            beta=args.beta,
            loss_type=args.loss_type,
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        print(
            f"step {step:3d}  loss {loss.item():.4f}  reward acc {metrics['rewards/accuracies'].item():.2f}  "
            f"margin {metrics['rewards/margins'].item():+.4f}",
            flush=True,
        )
    print(f"done: {args.steps} steps in {time.time() - t0:.1f} s ({'LoRA' if use_peft else 'full fine-tuning'})")


if __name__ == "__main__":
    main()
