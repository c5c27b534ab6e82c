"""Build a tiny random causal LM folder (Llama or Qwen2 layout) with its own small tokenizer, fully offline.

    python tests/tiny.py out/smoke/tiny-llama
    python tests/tiny.py --arch qwen2 /tmp/tiny-qwen

The tokenizer is a byte-level BPE trained in-process on GSM8K questions, with a ChatML template, so every stage
(chat prompts included) runs on it. Weights are random (seeded): the outputs are gibberish by design.
"""
import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "..", "data", "gsm8k", "train.jsonl")
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tiny_tokenizer(vocab_size=400, n_texts=300):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    with open(DATA, encoding="utf-8") as f:
        texts = [json.loads(next(f))["question"] for _ in range(n_texts)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_model(arch="llama", vocab_size=400, seed=0, hidden=64, layers=2, intermediate=128, init=0.2):
    """Weights drawn with std `init`, ten times transformers' default 0.02: at 0.02 a model this small is its
    embedding read back through the tied lm_head (zeroing every attention output changed none of 84 greedy tokens),
    so token-equality tests could not see a broken cache, mask or attention. At 0.2 zeroing it changes 83 of the 84."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config
    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[arch]
    cfg = cls(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
              tie_word_embeddings=True, bos_token_id=None, eos_token_id=2, pad_token_id=0, initializer_range=init)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg).eval()


def save_tiny(path, arch="llama", seed=0):
    tok = tiny_tokenizer()
    model = tiny_model(arch, len(tok), seed)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", help="output model folder")
    p.add_argument("--arch", choices=("llama", "qwen2"), default="llama", help="decoder layout")
    p.add_argument("--seed", type=int, default=0, help="weight initialisation seed")
    args = p.parse_args(argv)
    save_tiny(args.out, args.arch, args.seed)
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
