"""Training on real preprocessed text (stdlib corpus -> SentencePiece -> Megatron .bin/.idx), not mock
tokens: the loss falls, every layout sees the same samples (losses equal the single process), blending
works under data parallelism, and a resume continues the exact loss sequence."""

from __future__ import annotations

import pytest

from tests.harness import TINY_ARGS, train_losses
from tests.unit.test_data_tools import preprocess, tool

TP, PP, EP = "--tensor-model-parallel-size", "--pipeline-model-parallel-size", "--expert-model-parallel-size"


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


def _same(a_recs, b_recs):
    assert len(a_recs) == len(b_recs) == 10
    for a, b in zip(a_recs, b_recs):
        for key in ("lm_loss", "aux_loss", "z_loss", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), (a["iteration"], key)


@pytest.fixture(scope="module")
def single(data):
    return _train(1, _args(data, str(data / "a_text_document")))


def test_loss_falls_on_real_text(single):
    assert single[-1]["lm_loss"] < single[0]["lm_loss"] - 0.5


@pytest.mark.parametrize("world, extra", [
    (4, [EP, "2"]),  # DP 4: every rank its own slice of each global batch
    (4, [TP, "2", "--sequence-parallel", PP, "2"]),
], ids=["dp4-ep2", "tp2-sp-pp2"])
def test_layouts_see_the_same_real_samples(data, single, world, extra):
    _same(single, _train(world, _args(data, str(data / "a_text_document")) + extra))


def test_blended_real_data_under_data_parallelism(data):
    blend = _args(data, "0.7", str(data / "a_text_document"), "0.3", str(data / "b_text_document"))
    one = _train(1, blend)
    _same(one, _train(2, blend))
    assert one[-1]["lm_loss"] < one[0]["lm_loss"] - 0.3  # it trains on the blend


def test_resume_on_real_data_is_exact(data, tmp_path):
    args = _args(data, str(data / "a_text_document")) + ["--lr-decay-iters", "6", EP, "2"]
    full = _train(2, args + ["--train-iters", "6"])
    _train(2, args + ["--train-iters", "3", "--save", str(tmp_path)])
    resumed = _train(2, args + ["--train-iters", "6", "--load", str(tmp_path)])
    assert [r["lm_loss"] for r in resumed] == [r["lm_loss"] for r in full[3:]]
