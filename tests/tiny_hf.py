"""A tiny GPT-2 with a byte-level BPE tokenizer trained on a few strings, saved as Hugging Face files and converted."""

import json
import os

TEXTS = ["the quick brown fox jumps over the lazy dog", "hello world, hello paxlike",
         "def main(): return 0", "a tiny tokenizer for a tiny model", "lazy dogs sleep all day"]
EOS = "<|endoftext|>"


def train_tokenizer():
    """A byte-level BPE of about 300 ids (every byte, merges, and EOS at id 0), trained by `tokenizers`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(TEXTS, trainer)
    return tokenizer


def converted_gpt2(root, with_tokenizer: bool = True):
    """(HF model, tokenizer, paxlike model dir): a random 2-layer GPT-2 of 384 ids converted with from_hf."""
    import torch
    import transformers

    from paxlike.hf import convert as hf_convert

    tokenizer = train_tokenizer()
    eos_id = tokenizer.token_to_id(EOS)
    config = transformers.GPT2Config(vocab_size=384, n_embd=64, n_layer=2, n_head=4,
                                     n_positions=128, bos_token_id=eos_id, eos_token_id=eos_id)
    torch.manual_seed(0)
    hf_model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for p in hf_model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    hf_dir, model_dir = os.path.join(root, "hf"), os.path.join(root, "pax")
    hf_model.eval().save_pretrained(hf_dir, safe_serialization=True)
    if with_tokenizer:
        tokenizer.save(os.path.join(hf_dir, "tokenizer.json"))
        with open(os.path.join(hf_dir, "tokenizer_config.json"), "w") as f:
            json.dump({"bos_token": EOS, "eos_token": EOS, "model_max_length": 128}, f)
    hf_convert.from_hf(hf_dir, model_dir, "gpt2")
    return hf_model, tokenizer, model_dir


def hf_logits(model, tokens_bt):
    """A transformers model's float32 logits for int tokens (B, T), as numpy."""
    import torch

    with torch.no_grad():
        return model(torch.from_numpy(tokens_bt).long()).logits.float().numpy()
