"""Data: Megatron mmap indexed datasets, GPT samples, blending, tokenizers, mock data, sampler."""

from megamoe.data.errors import DataError

__all__ = ["DataError", "build_train_valid_test_datasets"]


def __getattr__(name: str):  # lazy: importing the package must not need sentencepiece
    if name == "build_train_valid_test_datasets":
        from megamoe.data.builder import build_train_valid_test_datasets

        return build_train_valid_test_datasets
    raise AttributeError(name)
