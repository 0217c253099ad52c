"""TRL trainers with prefopt_fast, run as users launch them; driven by tests/test_trainers_distributed.py.

    python distributed_trainer_script.py --save-models MODEL_DIR     # MODEL_DIR and MODEL_DIR_tied
    accelerate launch --config_file fsdp2.yaml --num_processes 2 distributed_trainer_script.py MODEL_DIR OUT_DIR
    python distributed_trainer_script.py MODEL_DIR OUT_DIR --reference
    (optionally followed by case names: only those run)

Cases (:data:`CASES`), each a few optimizer steps of a tiny fp32 Llama (MODEL_DIR, or the tied
MODEL_DIR_tied) with plain SGD:

* ``dpo_patch``: ``trl.DPOTrainer`` under :func:`prefopt_fast.integrations.trl.patch_trl`;
* ``dpo_sub``: :class:`prefopt_fast.integrations.trl.DPOTrainer` (tied head);
* ``grpo`` / ``dapo`` (dapo: tied head): :class:`prefopt_fast.integrations.trl.GRPOTrainer` (loss
  types grpo with a KL term and an entropy bonus / dapo), generation replaced by fixed
  completions (sampling differs between a 2-process and a 1-process run, so a sampled run could
  not be compared); the old and reference log-probs are still computed by TRL's own code path
  on the policy / reference model.

``--reference``: one process, TRL's own trainers and kernel (no prefopt_fast), every batch the
global batch of the distributed run (per-device batch x processes). Rank 0 writes
``OUT_DIR/<case>.json`` (log history, the weight types the patched head received) and
``OUT_DIR/<case>.pt`` (the full trained parameters).
"""

import json
import os
import random
import sys

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import datasets  # noqa: E402
import transformers  # noqa: E402
import trl  # noqa: E402
from accelerate.utils import gather_object  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402

from prefopt_fast.distributed import is_dtensor  # noqa: E402
from prefopt_fast.integrations import trl as ptrl  # noqa: E402

V = 96
NPROC_GLOBAL = 2  # processes of the distributed run: the reference's batch is this many per-device batches
STEPS = 3


def tokenizer():
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{f"w{i}": i + 3 for i in range(V - 3)}}
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=t, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )


def save_tiny_model(path: str, tied: bool = False, seed: int = 0) -> None:
    """A random 2-layer Llama (vocab 96, hidden 32; ``tied``: the LM head is the input embedding), saved
    for both launches to load."""
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
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
        tie_word_embeddings=tied,
    )
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)


def _words(r, lo, hi):
    return " ".join(f"w{r.randrange(V - 3)}" for _ in range(r.randint(lo, hi)))


def preference_dataset(n, seed=0):
    r = random.Random(seed)
    rows = [
        dict(prompt=_words(r, 1, 4), chosen=" " + _words(r, 1, 4), rejected=" " + _words(r, 1, 4)) for _ in range(n)
    ]
    return datasets.Dataset.from_list(rows)


def common_args(out_dir, per_device, **kw):
    base = dict(
        output_dir=os.path.join(out_dir, "trainer"),
        per_device_train_batch_size=per_device,
        max_steps=STEPS,
        logging_steps=1,
        report_to=[],
        bf16=False,
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


# --------------------------------------------------------------------------- FSDP2 on CPU


def allow_fsdp_on_cpu() -> None:
    """Let an accelerate FSDP configuration take effect on a CPU (gloo) run.

    accelerate 1.16 turns an FSDP config into ``DistributedType.FSDP`` only for accelerator
    devices; on CPU it silently runs plain data parallel (``MULTI_CPU``: replicated weights,
    DDP). Here the state is switched to FSDP with the plugin accelerate built from the config,
    so the Trainer's own FSDP2 path runs (accelerate's ``fully_shard`` of the decoder layers, the
    embedding, the [final norm, lm_head] tail and the root; TRL's ``prepare_fsdp`` of the reference
    model; sharded gradient clipping). GPU runs need none of this.
    """
    import accelerate.state
    from accelerate.utils import DistributedType

    original = accelerate.state.AcceleratorState.__init__
    if getattr(original, "_prefopt_fsdp_on_cpu", False):
        return

    def init(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            # every later AcceleratorState() re-reads the distributed type from PartialState's shared state
            accelerate.state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin

    init._prefopt_fsdp_on_cpu = True
    accelerate.state.AcceleratorState.__init__ = init


# --------------------------------------------------------------------------- GRPO without sampling


def _global_rollout(step: int, B: int, P: int = 3, T: int = 6):
    """The completions of generation round ``step``: the same global batch for every launch."""
    g = torch.Generator().manual_seed(1000 + step)
    completion_mask = torch.ones(B, T, dtype=torch.long)
    lengths = torch.randint(2, T + 1, (B,), generator=g)
    completion_mask[torch.arange(T) >= lengths.unsqueeze(1)] = 0
    return {
        "prompt_ids": torch.randint(3, V, (B, P), generator=g),
        "prompt_mask": torch.ones(B, P, dtype=torch.long),
        "completion_ids": torch.randint(3, V, (B, T), generator=g),
        "completion_mask": completion_mask,
        "advantages": torch.randn(B, generator=g),
        "old_noise": 0.3 * torch.randn(B, T, generator=g),
    }


def _fixed_rollouts(base):
    class Fixed(base):
        """GRPO whose 'generation' returns this process's rows of a fixed global rollout; the old and
        reference log-probs come from TRL's ``_get_per_token_logps_and_entropies`` as in TRL's own."""

        def _generate_and_score_completions(self, inputs):
            acc = self.accelerator
            n_local = len(inputs)
            step = getattr(self, "_rollouts", 0)
            self._rollouts = step + 1
            full = _global_rollout(step, n_local * acc.num_processes)
            lo = acc.process_index * n_local
            out = {k: v[lo : lo + n_local].to(acc.device) for k, v in full.items()}
            noise = out.pop("old_noise")
            ids = torch.cat([out["prompt_ids"], out["completion_ids"]], 1)
            am = torch.cat([out["prompt_mask"], out["completion_mask"]], 1)
            T = out["completion_ids"].size(1)
            with torch.no_grad():
                lp, _, _ = self._get_per_token_logps_and_entropies(self.model, ids, am, T)
                out["old_per_token_logps"] = lp + noise  # off-policy: the clipping is exercised
                if self.beta != 0.0:
                    out["ref_per_token_logps"], _, _ = self._get_per_token_logps_and_entropies(
                        self.ref_model, ids, am, T
                    )
            out["num_items_in_batch"] = acc.gather(out["completion_mask"].sum()).sum()
            return out

    return Fixed


def _reward_unused(completions, **kw):
    return [0.0 for _ in completions]


def prompt_dataset(n, seed=0):
    r = random.Random(seed)
    return datasets.Dataset.from_list([dict(prompt=_words(r, 1, 4)) for _ in range(n)])


# --------------------------------------------------------------------------- the cases

# name -> (trainer kind, prefopt_fast's part: "patch" = TRL's trainer under patch_trl(), "subclass" =
# prefopt_fast's trainer; tied LM head; config). The reference runs TRL's trainer with the same config.
CASES = {
    "dpo_patch": ("dpo", "patch", False, dict(learning_rate=0.5)),
    # loss types whose batch loss is a mean over pairs: TRL's sft term (a token mean over each process's
    # batch) or bnpo would differ from the one-process run in TRL itself
    "dpo_sub": ("dpo", "subclass", True, dict(learning_rate=0.5, loss_type=["sigmoid", "ipo"], loss_weights=[1, 0.5])),
    "grpo": ("grpo", "subclass", False, dict(loss_type="grpo", beta=0.04, entropy_coef=0.01)),
    "dapo": ("grpo", "subclass", True, dict(loss_type="dapo", importance_sampling_level="sequence", epsilon_high=0.28)),
}


def run_case(case, model_dir, out_dir, reference, nproc):
    kind, ours, tied, cfg = CASES[case]
    model = model_dir + ("_tied" if tied else "")
    seen = []
    real = ptrl.PrefoptChunkedLogProbFunction.apply

    def spy(hidden, weight, *a, **k):  # what the patched head is handed under this launch
        seen.append("DTensor" if is_dtensor(weight) else type(weight).__name__)
        return real(hidden, weight, *a, **k)

    ptrl.PrefoptChunkedLogProbFunction.apply = staticmethod(spy)
    scale = nproc if reference else 1  # the reference's batch is the distributed run's global batch
    try:
        if kind == "dpo":
            args = trl.DPOConfig(**common_args(out_dir, 2 * scale, max_length=16, **cfg))
            cls = ptrl.DPOTrainer if ours == "subclass" and not reference else trl.DPOTrainer
            train_dataset = preference_dataset(2 * NPROC_GLOBAL * STEPS)
            kw = {}
        else:
            n_gen = 2
            args = trl.GRPOConfig(
                **common_args(
                    out_dir,
                    2 * n_gen * scale,
                    num_generations=n_gen,
                    max_completion_length=6,
                    model_init_kwargs={"dtype": torch.float32},
                    **cfg,
                )
            )
            cls = _fixed_rollouts(ptrl.GRPOTrainer if ours == "subclass" and not reference else trl.GRPOTrainer)
            train_dataset = prompt_dataset(2 * NPROC_GLOBAL * STEPS)
            kw = dict(reward_funcs=_reward_unused)
        if ours == "patch" and not reference:
            ptrl.patch_trl()
        try:
            trainer = cls(model=model, args=args, train_dataset=train_dataset, processing_class=tokenizer(), **kw)
            # before train(): not yet sharded
            start = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
            trainer.train()
        finally:
            ptrl.unpatch_trl()
    finally:
        ptrl.PrefoptChunkedLogProbFunction.apply = staticmethod(real)
    # every rank takes part in the gathers of the sharded parameters
    params = {}
    for name, p in trainer.model.named_parameters():
        params[name] = (p.full_tensor() if is_dtensor(p) else p).detach().cpu().clone()
    acc = trainer.accelerator
    weight_types = gather_object([sorted(set(seen))])
    if acc.is_main_process:
        info = {
            "log_history": trainer.state.log_history,
            "num_processes": acc.num_processes,
            "fsdp_version": getattr(getattr(acc.state, "fsdp_plugin", None), "fsdp_version", None),
            "weight_types": weight_types,
            "model_class": type(trainer.model).__name__,
            "distributed_type": str(acc.distributed_type),
            "is_fsdp2": bool(getattr(acc, "is_fsdp2", False)),
            "lm_head_weight": type(trainer.model.get_output_embeddings().weight).__name__,
            "moved": max((params[n] - start[n]).abs().max().item() for n in start),
        }
        with open(os.path.join(out_dir, f"{case}.json"), "w") as f:
            json.dump(info, f)
        torch.save(params, os.path.join(out_dir, f"{case}.pt"))
    acc.wait_for_everyone()


def main(argv):
    if argv[0] == "--save-models":  # MODEL_DIR and MODEL_DIR_tied
        save_tiny_model(argv[1])
        save_tiny_model(argv[1] + "_tied", tied=True)
        return
    model_dir, out_dir = argv[0], argv[1]
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and not torch.cuda.is_available():
        allow_fsdp_on_cpu()
    reference = "--reference" in argv
    cases = [a for a in argv[2:] if not a.startswith("--")] or list(CASES)
    for case in cases:
        run_case(case, model_dir, out_dir, reference, NPROC_GLOBAL)


if __name__ == "__main__":
    main(sys.argv[1:])
