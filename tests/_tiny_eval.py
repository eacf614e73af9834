"""Evaluation-test helpers: a byte-level BPE tokenizer (so word-boundary merges and a BOS token are exercised,
unlike the character tokenizer of ``_tiny``) and a tiny fixture data directory."""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from _tiny import tiny_config

FIXTURES = Path(__file__).parent / "fixtures" / "eval"
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>"]
TRAINING_TEXT = [
    "Q: What is the capital of France?\nA: Paris is the capital of France.",
    "The quick brown fox jumps over the lazy dog. It was a lovely film with lovely performances.",
    "Question: Is this sentence positive or negative?\nAnswer: positive negative",
    "Telescopes use lenses or mirrors to focus light and make objects appear closer.",
    "Water boils at 100 degrees Celsius at sea level; ice melts at zero degrees.",
]


@functools.cache
def _trained_bpe(bos: bool) -> str:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(TRAINING_TEXT * 4, trainer=trainer)
    if bos:
        # Like Llama and Gemma tokenizers: every encoded text starts with <s>.
        tokenizer.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", tokenizer.token_to_id("<s>"))]
        )
    return tokenizer.to_str()


def bpe_tokenizer(bos: bool = True) -> PreTrainedTokenizerFast:
    """320-token byte-level BPE (any text encodes) with ``<pad>``=0, ``<s>``=1, ``</s>``=2."""
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_trained_bpe(bos)),
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
    )


def bpe_llama(seed: int = 0, num_layers: int = 2) -> torch.nn.Module:
    """A tiny random Llama whose vocabulary matches :func:`bpe_tokenizer`."""
    torch.manual_seed(seed)
    config = tiny_config("llama", num_layers)
    config.vocab_size = len(bpe_tokenizer())
    return AutoModelForCausalLM.from_config(config).eval()
