"""SentencePiece tokenizer behind the small interface the data pipeline and training need.

Megatron's ``GPTSentencePieceTokenizer`` semantics: ``tokenize`` adds no BOS/EOS; documents are
separated by ``eod`` (the model's EOS piece), which preprocess_data.py appends with ``--append-eod``.
"""

from __future__ import annotations

import os

from megamoe.data.errors import DataError

TOKENIZER_TYPES = ("SentencePieceTokenizer", "GPTSentencePieceTokenizer")


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


Tokenizer = SentencePieceTokenizer


def build_tokenizer(tokenizer_type: str, tokenizer_model: str) -> Tokenizer:
    """The tokenizer named by ``--tokenizer-type`` (SentencePiece only, GPT alias accepted)."""
    if tokenizer_type not in TOKENIZER_TYPES:
        raise DataError(f"--tokenizer-type {tokenizer_type}: unsupported tokenizer type; use one of "
                        f"{', '.join(TOKENIZER_TYPES)}")
    return SentencePieceTokenizer(tokenizer_model)
