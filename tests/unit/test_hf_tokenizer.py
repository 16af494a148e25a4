"""--tokenizer-type HuggingFaceTokenizer --tokenizer-model DIR: a tokenizer built here (the `tokenizers`
library, saved as transformers saves one; nothing downloaded) tokenises for preprocess_data.py and
training, from a local directory."""

from __future__ import annotations

import importlib.util
import json
import os
import sys

import pytest

from megamoe.data.errors import DataError
from megamoe.data.tokenizer import build_tokenizer
from tests.harness import train_losses

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TEXTS = [f"def f{i}(x):\n    return x * {i} + {i * i}  # line {i}\n" for i in range(200)]


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory) -> str:
    """A byte-level BPE of ~300 tokens with an EOS token, saved with save_pretrained."""
    d = tmp_path_factory.mktemp("tok")
    bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(TEXTS, trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(d)
    return str(d)


def test_hf_tokenizer_from_a_local_directory(hf_tokenizer, tmp_path):
    tok = build_tokenizer("HuggingFaceTokenizer", hf_tokenizer)
    assert tok.vocab_size == 300 and tok.eod == 1
    ids = tok.tokenize(TEXTS[7])
    assert tok.eod not in ids and tok.detokenize(ids) == TEXTS[7]  # no BOS/EOS added, exact round trip
    assert tok.tokenize_batch(TEXTS[:3]) == [tok.tokenize(t) for t in TEXTS[:3]]
    with pytest.raises(DataError, match="not a directory"):
        build_tokenizer("HuggingFaceTokenizer", os.path.join(hf_tokenizer, "tokenizer.json"))
    with pytest.raises(DataError, match="not a Hugging Face tokenizer directory"):
        build_tokenizer("HuggingFaceTokenizer", str(tmp_path))


def test_preprocess_and_train_with_an_hf_tokenizer(hf_tokenizer, tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t * 3}) + "\n" for t in TEXTS))
    spec = importlib.util.spec_from_file_location(
        "tools_preprocess", os.path.join(ROOT, "tools", "preprocess_data.py")
    )
    preprocess = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = preprocess  # its dataclasses look their module up
    spec.loader.exec_module(preprocess)
    assert (
        preprocess.main(
            [
                "--input",
                str(corpus),
                "--json-keys",
                "text",
                "--output-prefix",
                str(tmp_path / "d"),
                "--tokenizer-type",
                "HuggingFaceTokenizer",
                "--tokenizer-model",
                hf_tokenizer,
                "--append-eod",
            ]
        )
        == 0
    )
    records = train_losses(
        1,
        [
            "--model-preset",
            "mixtral-tiny",
            "--data-path",
            str(tmp_path / "d_text_document"),
            "--tokenizer-type",
            "HuggingFaceTokenizer",
            "--tokenizer-model",
            hf_tokenizer,
            "--split",
            "90,10,0",
            "--seq-length",
            "32",
            "--global-batch-size",
            "4",
            "--micro-batch-size",
            "2",
            "--train-iters",
            "3",
            "--log-interval",
            "1000",
            "--eval-interval",
            "100000",
            "--eval-iters",
            "1",
        ],
        base_args=[],
    )
    assert len(records) == 3 and all(r["lm_loss"] < 7.0 for r in records)  # vocabulary 300: ln 300 = 5.7
