"""``cmpq quantize --method mixllm`` -> checkpoint -> eval / inspect, on a tiny random Llama directory."""
from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from cmpq_kernels import MixLLMLinear, cli, load_mixllm  # noqa: E402
from test_cli import save_tiny_llama, texts  # noqa: E402,F401  (texts: a fixture)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    """A plain HF directory: a Llama wide enough (hidden 160) for MixLLM's min(n, k) > 64 rule, BPE tokenizer."""
    return save_tiny_llama(str(tmp_path_factory.mktemp("fp") / "tiny-llama-160"), 160, 320)


def test_quantize_eval_inspect(model_dir, texts, tmp_path, capsys):
    out = str(tmp_path / "tiny-mixllm")
    summary = tmp_path / "summary.json"
    assert cli.main(["quantize", "--model", model_dir, "--method", "mixllm", "--p", "10", "--calib", texts[0],
                     "--out", out, "--samples", "4", "--seq-len", "64", "--eval", texts[1], "--eval-seq-len", "64",
                     "--eval-tokens", "256", "--json", str(summary)]) == 0
    result = json.loads(summary.read_text())
    assert result["method"] == "mixllm" and result["bits"] == pytest.approx(4.4)
    assert result["perplexity"] < 1.5 * result["fp_perplexity"]
    assert "MixLLM W4.4A8" in capsys.readouterr().out
    model = load_mixllm(out)
    assert sum(isinstance(m, MixLLMLinear) for m in model.modules()) == 14
    assert cli.main(["eval", "--model", out, "--text", texts[1], "--seq-len", "64", "--max-tokens", "256"]) == 0
    assert cli.main(["inspect", out, "--json", str(tmp_path / "inspect.json")]) == 0
    table = capsys.readouterr().out
    assert "8-bit channels" in table and "model.layers.1.mlp.down_proj" in table
    rows = json.loads((tmp_path / "inspect.json").read_text())["layers"]
    channels = sum(r["shape"][0] for r in rows)
    assert sum(r["rows_8bit"] for r in rows) == round(0.1 * channels)
    assert cli.main(["inspect", out, "--png", str(tmp_path / "x.png")]) == 2
