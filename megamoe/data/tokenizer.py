"""SentencePiece and Hugging Face tokenizers behind the small interface the data pipeline and training
need.

Megatron's ``GPTSentencePieceTokenizer`` semantics: ``tokenize`` adds no BOS/EOS; documents are
separated by ``eod`` (the model's EOS piece), which preprocess_data.py appends with ``--append-eod``.
``HuggingFaceTokenizer`` (Megatron's name) loads a tokenizer from a LOCAL directory (tokenizer.json /
tokenizer_config.json, e.g. Mixtral's or OLMoE's) with transformers' AutoTokenizer, same semantics.
"""

from __future__ import annotations

import os

from megamoe.data.errors import DataError

TOKENIZER_TYPES = ("SentencePieceTokenizer", "GPTSentencePieceTokenizer", "HuggingFaceTokenizer")


class SentencePieceTokenizer:
    def __init__(self, model_path: str) -> None:
        import sentencepiece as spm  # imported here: `import megamoe.data` must not need it

        if not os.path.isfile(model_path):
            raise DataError(f"{model_path}: tokenizer model not found; train one with "
                            "tools/train_tokenizer.py or fix --tokenizer-model")
        self.model_path = model_path
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.Load(model_path)
        except (OSError, RuntimeError) as e:
            raise DataError(f"{model_path}: not a SentencePiece model ({str(e).splitlines()[0]}); "
                            "pass the .model file written by tools/train_tokenizer.py") from None
        self.vocab_size: int = self._sp.GetPieceSize()
        eos = self._sp.eos_id()
        if eos < 0:
            raise DataError(f"{model_path}: the SentencePiece model has no EOS piece, so documents "
                            "cannot be separated; retrain it with eos_id >= 0 (train_tokenizer.py does)")
        self.eod: int = eos

    def tokenize(self, text: str) -> list[int]:
        return self._sp.EncodeAsIds(text)

    def tokenize_batch(self, texts: list[str]) -> list[list[int]]:
        return self._sp.Encode(texts, num_threads=1)  # one thread: parallelism is per worker process

    def detokenize(self, ids: list[int]) -> str:
        return self._sp.DecodeIds([int(i) for i in ids])


class HuggingFaceTokenizer:
    """A Hugging Face tokenizer from a local directory (no downloads). vocab_size counts added tokens
    (len(tokenizer)), eod is its EOS token."""

    def __init__(self, path: str) -> None:
        if not os.path.isdir(path):
            raise DataError(f"{path}: not a directory; --tokenizer-type HuggingFaceTokenizer takes the local "
                            "directory of a Hugging Face tokenizer (tokenizer.json, tokenizer_config.json)")
        from transformers import AutoTokenizer  # imported here: `import megamoe.data` must not need it

        try:
            self._tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError, TypeError, KeyError) as e:
            why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DataError(f"{path}: not a Hugging Face tokenizer directory ({why}); save one with "
                            "tokenizer.save_pretrained(DIR)") from None
        self.model_path = path
        self.vocab_size: int = len(self._tok)
        if self._tok.eos_token_id is None:
            raise DataError(f"{path}: the tokenizer has no EOS token, so documents cannot be separated; set "
                            "eos_token in its tokenizer_config.json")
        self.eod: int = self._tok.eos_token_id

    def tokenize(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False)

    def tokenize_batch(self, texts: list[str]) -> list[list[int]]:
        return self._tok(texts, add_special_tokens=False)["input_ids"] if texts else []

    def detokenize(self, ids: list[int]) -> str:
        return self._tok.decode([int(i) for i in ids])


Tokenizer = SentencePieceTokenizer | HuggingFaceTokenizer


def build_tokenizer(tokenizer_type: str, tokenizer_model: str) -> Tokenizer:
    """The tokenizer named by ``--tokenizer-type`` (SentencePiece, its GPT alias, or Hugging Face)."""
    if tokenizer_type not in TOKENIZER_TYPES:
        raise DataError(f"--tokenizer-type {tokenizer_type}: unsupported tokenizer type; use one of "
                        f"{', '.join(TOKENIZER_TYPES)}")
    if tokenizer_type == "HuggingFaceTokenizer":
        return HuggingFaceTokenizer(tokenizer_model)
    return SentencePieceTokenizer(tokenizer_model)
