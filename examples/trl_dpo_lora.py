"""DPO with LoRA on a tiny causal LM, using TRL's DPOTrainer with prefopt_fast swapped in.

Everything is built in code (no download): a word-level tokenizer, a 2-layer Llama from a
config, and an in-memory preference set where the chosen answers use even-numbered words
and the rejected ones odd-numbered words (a preference LoRA can learn). Runs on CPU in
well under two minutes and prints the loss and the reward accuracy at every step.

    python examples/trl_dpo_lora.py              # 40 steps
    python examples/trl_dpo_lora.py --steps 3    # (or PREFOPT_EXAMPLE_STEPS=3) what CI runs

Needs: trl, peft (pip install "prefopt_fast[trl]" peft).
"""

import argparse
import os
import random
import tempfile
import time
import warnings

import torch

VOCAB = 1000


def build_tokenizer():
    """A word-level tokenizer over "w0" ... "w996" plus <pad>, </s>, <unk>."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{f"w{i}": i + 3 for i in range(VOCAB - 3)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def build_dataset(n: int, seed: int = 0):
    """Chosen answers use even-numbered words, rejected ones odd-numbered words, after random prompts."""
    from datasets import Dataset

    r = random.Random(seed)
    n_words = VOCAB - 3

    def words(parity, k):
        return " ".join(f"w{2 * r.randrange(n_words // 2) + parity}" for _ in range(k))

    rows = []
    for _ in range(n):
        prompt = " ".join(f"w{r.randrange(n_words)}" for _ in range(r.randint(2, 4)))
        k = r.randint(2, 3)
        rows.append(dict(prompt=prompt, chosen=" " + words(0, k), rejected=" " + words(1, k)))
    return Dataset.from_list(rows)


def build_model(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=1,
    )
    return LlamaForCausalLM(cfg)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=int(os.environ.get("PREFOPT_EXAMPLE_STEPS", 40)))
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--beta", type=float, default=0.5)
    p.add_argument("--loss-type", default="sigmoid")
    args = p.parse_args(argv)

    warnings.filterwarnings("ignore", category=FutureWarning)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from peft import LoraConfig
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback
    from trl import DPOConfig

    from prefopt_fast.integrations.trl import DPOTrainer  # TRL's DPOTrainer with prefopt_fast inside

    class PrintMetrics(TrainerCallback):
        def on_log(self, _args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                print(
                    f"step {state.global_step:3d}  loss {logs['loss']:.4f}  "
                    f"reward acc {logs['rewards/accuracies']:.2f}  margin {logs['rewards/margins']:+.4f}",
                    flush=True,
                )

    t0 = time.time()
    with tempfile.TemporaryDirectory() as out:
        config = DPOConfig(
            output_dir=out,
            max_steps=args.steps,
            per_device_train_batch_size=args.batch_size,
            learning_rate=args.lr,
            beta=args.beta,
            loss_type=[args.loss_type],
            max_length=16,
            logging_steps=1,
            report_to=[],
            save_strategy="no",
            use_cpu=True,
            bf16=False,
            gradient_checkpointing=False,
            disable_tqdm=True,
            seed=0,
        )
        trainer = DPOTrainer(
            model=build_model(),
            args=config,
            train_dataset=build_dataset(64),
            processing_class=build_tokenizer(),
            callbacks=[PrintMetrics()],
            # LoRA: the reference model is the base model with the adapter disabled
            peft_config=LoraConfig(
                r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], lora_dropout=0.0
            ),
        )
        trainer.remove_callback(PrinterCallback)  # our callback prints the per-step line instead
        result = trainer.train()
    print(f"done: {args.steps} steps in {time.time() - t0:.1f} s, final train loss {result.training_loss:.4f}")


if __name__ == "__main__":
    main()
