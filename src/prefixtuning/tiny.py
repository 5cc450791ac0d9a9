"""Tiny local backbones for offline runs and tests.

A tiny backbone is a real Hugging Face model of a real family (GPT-2, BART, Llama with grouped-query
attention, T5 with its relative position bias) with a byte-level BPE tokenizer trained here with the `tokenizers` library. It is built
once from a config, written with `save_pretrained`, and then loaded back through exactly the same
`from_pretrained` path that hub ids such as `gpt2-medium` take. Weights are initialized from a seed
(seeded) and pretrained for a few hundred steps on the shipped E2E sample lines, so the frozen model is
a small but real language model: tables and texts are seen only separately, never paired.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import torch

from .cache import default_cache_dir, publish_dir
from .data.e2e import linearize_mr, read_e2e_csv, sample_dir

TINY_FAMILIES = ("gpt2", "bart", "llama", "t5", "bert")
# Bump when the recipe below changes, so cached builds are not reused across recipes.
_RECIPE_VERSION = 4


def _corpus() -> list[str]:
    """Text the tokenizer is trained on: the E2E sample that ships with the package, plus ASCII."""
    lines = []
    for split in ("train", "dev", "test"):
        for ex in read_e2e_csv(sample_dir() / f"{split}.csv"):
            lines.append(linearize_mr(ex.mr))
            lines.append(ex.ref)
    lines.append("table-to-text: summarize: elephant divide " + "".join(chr(c) for c in range(32, 127)))
    return lines


def _train_tokenizer(family: str, vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if family == "bert":  # BERT's own scheme: WordPiece, [CLS] a [SEP] b [SEP] with token types 0 / 1
        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = None
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        tok.train_from_iterator(_corpus(), trainer=trainers.WordPieceTrainer(
            vocab_size=vocab_size, special_tokens=specials, show_progress=False,
            initial_alphabet=[chr(c) for c in range(33, 127)]))
        cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
        return PreTrainedTokenizerFast(tokenizer_object=tok, cls_token="[CLS]", sep_token="[SEP]", pad_token="[PAD]",
                                       unk_token="[UNK]", mask_token="[MASK]",
                                       model_input_names=["input_ids", "token_type_ids", "attention_mask"])

    if family == "bart":
        specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    elif family == "t5":  # T5's convention: pad 0 (also the decoder's start token), eos 1, unk 2, a sentinel
        specials = ["<pad>", "</s>", "<unk>", "<extra_id_0>"]
    else:
        specials = ["<|endoftext|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    if family == "bart":
        bos, eos = tok.token_to_id("<s>"), tok.token_to_id("</s>")
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", bos), ("</s>", eos)]
        )
        return PreTrainedTokenizerFast(
            tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
            mask_token="<mask>",
        )
    if family == "t5":  # no bos; every sequence ends with </s>
        eos = tok.token_to_id("</s>")
        tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                           special_tokens=[("</s>", eos)])
        return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                                       mask_token="<extra_id_0>")
    # GPT-2 convention: one special token serves as bos, eos and (here) pad.
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )


def _config(family: str, tokenizer, size: dict):
    from transformers import BartConfig, BertConfig, GPT2Config, LlamaConfig, T5Config

    d, layers, heads, positions = size["hidden"], size["layers"], size["heads"], size["positions"]
    vocab = len(tokenizer)
    if family == "gpt2":
        eos = tokenizer.eos_token_id
        return GPT2Config(vocab_size=vocab, n_positions=positions, n_embd=d, n_layer=layers, n_head=heads,
                          bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
    if family == "bart":
        return BartConfig(vocab_size=vocab, d_model=d, encoder_layers=layers, decoder_layers=layers,
                          encoder_attention_heads=heads, decoder_attention_heads=heads, encoder_ffn_dim=2 * d,
                          decoder_ffn_dim=2 * d, max_position_embeddings=positions,
                          pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.eos_token_id,
                          forced_bos_token_id=None, forced_eos_token_id=None)
    if family == "t5":  # T5 v1.1 / Flan-T5 layout: gated-GELU feed-forward, untied output embedding
        return T5Config(vocab_size=vocab, d_model=d, d_kv=d // heads, d_ff=2 * d, num_layers=layers,
                        num_decoder_layers=layers, num_heads=heads, relative_attention_num_buckets=32,
                        relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
                        tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id,
                        eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id)
    if family == "bert":
        return BertConfig(vocab_size=vocab, hidden_size=d, num_hidden_layers=layers, num_attention_heads=heads,
                          intermediate_size=2 * d, max_position_embeddings=min(positions, 512),
                          pad_token_id=tokenizer.pad_token_id)
    if family == "llama":
        eos = tokenizer.eos_token_id
        return LlamaConfig(vocab_size=vocab, hidden_size=d, intermediate_size=2 * d, num_hidden_layers=layers,
                           num_attention_heads=heads, num_key_value_heads=size["kv_heads"],
                           max_position_embeddings=positions, bos_token_id=eos, eos_token_id=eos,
                           pad_token_id=eos, tie_word_embeddings=True)
    raise ValueError(f"unknown tiny family {family!r}; choose one of {TINY_FAMILIES}")


DEFAULT_SIZE = {"hidden": 64, "layers": 2, "heads": 4, "kv_heads": 2, "positions": 1024, "vocab": 1000,
                "pretrain_steps": None}
# An encoder-decoder needs longer to start using its encoder (cross-attention) at all.
PRETRAIN_STEPS = {"gpt2": 300, "llama": 300, "bart": 1000, "t5": 300, "bert": 300}


def _pretrain(model, tokenizer, steps: int, seed: int, name: str = "tiny") -> list[float]:
    """A short language-model pretraining on the corpus lines, each line on its own (tables and texts are
    never paired, so mapping a table to its text is left for the prefix to learn). Encoder-decoders learn
    to reconstruct a line from a copy with 15% of its tokens masked. Returns the loss curve."""
    g = torch.Generator().manual_seed(seed)
    lines = [tokenizer(t, add_special_tokens=False)["input_ids"][:60] for t in _corpus()]
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id  # BERT: [SEP]
    pad = tokenizer.pad_token_id
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    model.train()
    losses = []
    for _ in range(steps):
        idx = torch.randint(len(lines), (16,), generator=g).tolist()
        seqs = [lines[i] + [eos] for i in idx]
        n = max(map(len, seqs))
        ids = torch.full((len(seqs), n), pad)
        mask = torch.zeros_like(ids)
        for r, s in enumerate(seqs):
            ids[r, : len(s)], mask[r, : len(s)] = torch.tensor(s), 1
        labels = ids.masked_fill(mask == 0, -100)
        if model.config.is_encoder_decoder or model.config.model_type == "bert":  # BERT: masked-LM reconstruction
            noisy = ids.masked_fill((torch.rand(ids.shape, generator=g) < 0.15) & (mask == 1),
                                    tokenizer.mask_token_id)
            out = model(input_ids=noisy, attention_mask=mask, labels=labels)
        else:
            out = model(input_ids=ids, attention_mask=mask, labels=labels)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
        if (len(losses) % 100 == 0) or len(losses) == steps:
            print(f"[backbone] {name}: pretraining step {len(losses)}/{steps}, loss {losses[-1]:.3f}", flush=True)
    model.eval()
    return losses


def build_tiny(family: str, cache_dir: str | Path | None = None, seed: int = 0, **size) -> Path:
    """Build (once) and return the directory of a tiny `family` model, loadable with `from_pretrained`."""
    if family not in TINY_FAMILIES:
        raise ValueError(f"unknown tiny backbone family {family!r}; choose one of {', '.join(TINY_FAMILIES)}")
    size = {**DEFAULT_SIZE, **{k: v for k, v in size.items() if v is not None}}
    if size["pretrain_steps"] is None:
        size["pretrain_steps"] = PRETRAIN_STEPS[family]
    version = f"{_RECIPE_VERSION}-bert2" if family == "bert" else _RECIPE_VERSION  # tiny-bert's own revisions
    key = json.dumps({"family": family, "seed": seed, "size": size, "v": version}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:10]
    out = Path(cache_dir or default_cache_dir()) / "tiny" / f"tiny-{family}-{digest}"
    if (out / "DONE").exists():
        return out
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    t0 = time.perf_counter()
    print(f"[backbone] tiny-{family}: building once into {out} ({'WordPiece' if family == 'bert' else 'BPE'} tokenizer, {size['layers']} layers of "
          f"width {size['hidden']}, {size['pretrain_steps']} pretraining steps on the E2E sample lines)", flush=True)
    tokenizer = _train_tokenizer(family, size["vocab"])
    config = _config(family, tokenizer, size)
    torch.manual_seed(seed)
    if family == "bert":
        from transformers import BertForMaskedLM, BertModel

        model = BertForMaskedLM(config)
        losses = _pretrain(model, tokenizer, int(size["pretrain_steps"]), seed, name=f"tiny-{family}")
        # saved as the encoder with its pooler (what AutoModel loads; the pooler seeded here, not at load)
        encoder = BertModel(config, add_pooling_layer=True)
        missing = encoder.load_state_dict({k.removeprefix("bert."): v for k, v in model.state_dict().items()
                                           if k.startswith("bert.")}, strict=False).missing_keys
        if any(not k.startswith("pooler.") for k in missing):
            raise RuntimeError(f"tiny-bert: the masked-LM encoder lacks {missing}")
        model = encoder.eval()
    else:
        auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
        model = auto.from_config(config)
        losses = _pretrain(model, tokenizer, int(size["pretrain_steps"]), seed, name=f"tiny-{family}")
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "DONE").write_text(json.dumps({"recipe": json.loads(key), "pretrain_loss_first": losses[:1],
                                          "pretrain_loss_last": losses[-1:]}))
    publish_dir(tmp, out)
    print(f"[backbone] tiny-{family}: built in {time.perf_counter() - t0:.0f} s", flush=True)
    return out
