"""Build the bundled byte-level BPE tokenizer (committed under engine/assets/tokenizer/).

Hubs are unreachable here, so the default model needs a tokenizer that ships with the project. It is
trained on the synthetic generator's text; byte-level, so any UTF-8 text still encodes. Rebuild with
`python -m engine.data.build_tokenizer` (deterministic: same corpus, same vocabulary).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from engine.data.synthetic import sample_corpus
from engine.model import CHAT_TEMPLATE, TOKENIZER_DIR

ASSET_DIR = TOKENIZER_DIR
VOCAB_SIZE = 2048
PAD, BOS, EOS, USER, ASSISTANT = "<|pad|>", "<|bos|>", "<|end|>", "<|user|>", "<|assistant|>"
SPECIAL_TOKENS = [PAD, BOS, EOS, USER, ASSISTANT]


def build(out_dir: Path = ASSET_DIR, vocab_size: int = VOCAB_SIZE) -> Path:
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(sample_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        additional_special_tokens=[USER, ASSISTANT],
        chat_template=CHAT_TEMPLATE,
        model_max_length=4096,
        clean_up_tokenization_spaces=False,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out_dir)
    return out_dir


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", type=Path, default=ASSET_DIR)
    p.add_argument("--vocab-size", type=int, default=VOCAB_SIZE)
    args = p.parse_args(argv)
    print(f"tokenizer written to {build(args.out, args.vocab_size)}")


if __name__ == "__main__":
    main()
