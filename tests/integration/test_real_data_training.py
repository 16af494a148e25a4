"""Training on real preprocessed text (stdlib corpus -> SentencePiece -> Megatron .bin/.idx), not mock
tokens: the loss falls, every layout sees the same samples (losses equal the single process), blending
works under data parallelism, and a resume continues the exact loss sequence."""

from __future__ import annotations

import pytest

from tests.conftest import EP, PP, TP, assert_same_losses
from tests.harness import TINY_ARGS, train_losses
from tests.unit.test_data_tools import preprocess, tool


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("realdata")
    tool("make_corpus.py", "--source", "python-stdlib", "--output", d / "corpus.jsonl", "--max-bytes", 200000)
    tool("train_tokenizer.py", "--input", d / "corpus.jsonl", "--json-keys", "text", "--vocab-size", 512,
         "--model-prefix", d / "tok")
    preprocess(d, "a", "--workers", "1")
    preprocess(d, "b", "--workers", "2")
    return d


def _args(d, *paths: str) -> list[str]:
    base = [a for a in TINY_ARGS if a != "--mock-data"]
    return base + ["--data-path", *paths, "--tokenizer-model", str(d / "tok.model"), "--split", "90,10,0"]


def _train(world: int, args: list[str]) -> list[dict]:
    return train_losses(world, [], base_args=args)


@pytest.fixture(scope="module")
def single_real(data):
    """The single-process reference on real text (tests.conftest's ``single`` is on mock data)."""
    return _train(1, _args(data, str(data / "a_text_document")))


def test_the_vocabulary_follows_the_tokenizer_and_says_so(data, capsys):
    args = _args(data, str(data / "a_text_document")) + ["--train-iters", "1", "--vocab-size", "5000"]
    recs = _train(1, args)
    assert len(recs) == 1
    assert " > vocabulary 512 from --tokenizer-model (not --vocab-size 5000)" in capsys.readouterr().out


def test_loss_falls_on_real_text(single_real):
    assert single_real[-1]["lm_loss"] < single_real[0]["lm_loss"] - 0.5


@pytest.mark.parametrize("world, extra", [
    (4, [EP, "2"]),  # DP 4: every rank its own slice of each global batch
    (4, [TP, "2", "--sequence-parallel", PP, "2"]),
], ids=["dp4-ep2", "tp2-sp-pp2"])
def test_layouts_see_the_same_real_samples(data, single_real, world, extra):
    recs = _train(world, _args(data, str(data / "a_text_document")) + extra)
    assert_same_losses(single_real, recs, rel=1e-5)


def test_blended_real_data_under_data_parallelism(data):
    blend = _args(data, "0.7", str(data / "a_text_document"), "0.3", str(data / "b_text_document"))
    one = _train(1, blend)
    assert_same_losses(one, _train(2, blend), rel=1e-5)
    assert one[-1]["lm_loss"] < one[0]["lm_loss"] - 0.3  # it trains on the blend


def test_resume_on_real_data_is_exact(data, tmp_path):
    args = _args(data, str(data / "a_text_document")) + ["--lr-decay-iters", "6", EP, "2"]
    full = _train(2, args + ["--train-iters", "6"])
    _train(2, args + ["--train-iters", "3", "--save", str(tmp_path)])
    resumed = _train(2, args + ["--train-iters", "6", "--load", str(tmp_path)])
    assert [r["lm_loss"] for r in resumed] == [r["lm_loss"] for r in full[3:]]
