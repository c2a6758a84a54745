"""The ``cmpq`` command line and the end-to-end path it drives: quantize -> save -> load -> eval/generate/inspect.

A tiny random Llama with a byte-level BPE tokenizer trained in the test stands in for a real model (no
downloads); it is saved as a plain Hugging Face directory, which is one of the ``--model`` forms.
"""
from __future__ import annotations

import json
import os
import random

import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from cmpq_kernels import CMPQLinear, cli, inspection, load_quantized  # noqa: E402
from cmpq_kernels import checkpoint  # noqa: E402
from cmpq_kernels.checkpoint import checkpoint_bytes  # noqa: E402

WORDS = ("the a river city market winter engineer quietly built bridges across old stone roads while "
         "children watched from windows and merchants sold bread fish apples lamps rope maps").split()


def prose(seed: int, sentences: int) -> str:
    rng = random.Random(seed)
    return "\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14))).capitalize() + "."
                     for _ in range(sentences))


def save_tiny_llama(path: str, hidden_size: int, intermediate_size: int, **overrides) -> str:
    """A plain HF model directory at ``path``: a 2-block random Llama + a BPE tokenizer trained on :func:`prose`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([prose(0, 400)], trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                     unk_token="<unk>")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=hidden_size, intermediate_size=intermediate_size,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      vocab_size=len(tokenizer), max_position_embeddings=512, bos_token_id=1,
                                      eos_token_id=2, **overrides)
    transformers.LlamaForCausalLM(config).eval().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    """A plain HF model directory: tiny Llama (tied embeddings) + a BPE tokenizer trained on :func:`prose`."""
    return save_tiny_llama(str(tmp_path_factory.mktemp("fp") / "tiny-llama"), 64, 128, tie_word_embeddings=True)


@pytest.fixture(scope="module")
def texts(tmp_path_factory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("texts")
    calib, held_out = root / "calib.txt", root / "eval.txt"
    calib.write_text(prose(1, 300), encoding="utf-8")
    held_out.write_text(prose(2, 60), encoding="utf-8")
    return str(calib), str(held_out)


@pytest.fixture(scope="module")
def quantized(model_dir, texts, tmp_path_factory) -> tuple[str, dict]:
    out = str(tmp_path_factory.mktemp("q") / "tiny-cmpq")
    summary_path = out + ".json"
    assert cli.main(["quantize", "--model", model_dir, "--bits", "3", "--calib", texts[0], "--out", out,
                     "--samples", "8", "--seq-len", "64", "--eval", texts[1], "--eval-seq-len", "64",
                     "--prompt", "The river", "--max-new-tokens", "5", "--json", summary_path]) == 0
    with open(summary_path, encoding="utf-8") as f:
        return out, json.load(f)


def test_quantize_writes_checkpoint_and_reports(quantized, model_dir):
    out, summary = quantized
    assert sorted(f for f in os.listdir(out) if f.endswith(".json"))[:1] == ["config.json"]
    assert os.path.isfile(os.path.join(out, "tokenizer.json"))
    with open(os.path.join(out, "config.json"), encoding="utf-8") as f:
        qconfig = json.load(f)["quantization_config"]
    assert qconfig["quant_method"] == "cmpq" and qconfig["format_version"] == 1 and qconfig["bits"] == 3.0
    assert qconfig["settings"]["allocator"] == "greedy" and qconfig["settings"]["codebook_rows"] == 4
    assert len(qconfig["modules"]) == 2 * 7
    assert 3.0 < summary["effective_bits"] < 5.0 and summary["code_bits"] == pytest.approx(3.0, abs=0.05)
    assert summary["bytes_on_disk"]["weights"] == os.path.getsize(os.path.join(out, "model.safetensors"))
    assert summary["bytes_on_disk"]["quantized"] < summary["fp_bytes"]
    assert 1 < summary["fp_perplexity"] < 1e4 and 1 < summary["perplexity"] < 1e4
    assert summary["generate"]["new_tokens"] >= 1 and summary["generate"]["tokens_per_s"] > 0


def test_effective_bits_agree_with_bytes_on_disk(quantized):
    """The quantized tensors in the file are exactly the bits effective_bits counts (no hidden storage)."""
    out, summary = quantized
    with open(os.path.join(out, "config.json"), encoding="utf-8") as f:
        qconfig = json.load(f)["quantization_config"]
    weights = sum(m["in_features"] * m["out_features"] for m in qconfig["modules"].values())
    assert checkpoint_bytes(out)["quantized"] * 8 == pytest.approx(qconfig["effective_bits"] * weights, abs=1e-6 * weights)
    assert qconfig["effective_bits"] == pytest.approx(summary["effective_bits"], rel=1e-12)


def test_eval_matches_python_api(quantized, texts, tmp_path):
    out, _ = quantized
    result_path = str(tmp_path / "eval.json")
    assert cli.main(["eval", "--model", out, "--text", texts[1], "--seq-len", "64", "--device", "cpu",
                     "--json", result_path]) == 0
    with open(result_path, encoding="utf-8") as f:
        result = json.load(f)
    from cmpq_kernels.perplexity import perplexity

    model = load_quantized(out)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    with open(texts[1], encoding="utf-8") as f:
        expected = perplexity(model, tokenizer, f.read(), 64, 16384, progress=False)
    assert result["perplexity"] == pytest.approx(expected, rel=1e-6)
    _, summary = quantized
    assert result["perplexity"] == pytest.approx(summary["perplexity"], rel=1e-6), "saved model == in-memory model"


def test_generate_greedy_is_deterministic(quantized, tmp_path, capsys):
    out, _ = quantized
    runs = []
    for i in range(2):
        path = str(tmp_path / f"g{i}.json")
        assert cli.main(["generate", "--model", out, "--prompt", "The market", "--max-new-tokens", "6",
                         "--device", "cpu", "--json", path]) == 0
        with open(path, encoding="utf-8") as f:
            runs.append(json.load(f))
    assert runs[0]["text"] == runs[1]["text"] and runs[0]["new_tokens"] == 6
    assert "tokens/s" in capsys.readouterr().out


def test_generate_sampling_depends_on_seed(quantized, tmp_path):
    out, _ = quantized
    texts = set()
    for seed in range(4):
        path = str(tmp_path / f"s{seed}.json")
        assert cli.main(["generate", "--model", out, "--prompt", "The", "--max-new-tokens", "8", "--temperature", "1.5",
                         "--seed", str(seed), "--device", "cpu", "--json", path]) == 0
        with open(path, encoding="utf-8") as f:
            texts.add(json.load(f)["text"])
    assert len(texts) > 1


def test_inspect_table_json_and_png(quantized, tmp_path, capsys):
    out, summary = quantized
    png, path = str(tmp_path / "bits.png"), str(tmp_path / "inspect.json")
    pytest.importorskip("matplotlib")
    assert cli.main(["inspect", out, "--png", png, "--json", path]) == 0
    printed = capsys.readouterr().out
    assert "model.layers.0.self_attn.q_proj" in printed and "effective bits" in printed
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(path, encoding="utf-8") as f:
        rows = json.load(f)["layers"]
    assert len(rows) == 14
    for row in rows:
        assert sum(row["channels"].values()) == row["shape"][1]
    weights = sum(r["shape"][0] * r["shape"][1] for r in rows)
    assert sum(r["effective_bits"] * r["shape"][0] * r["shape"][1] for r in rows) / weights == \
        pytest.approx(summary["effective_bits"])


def test_channel_bits_follow_the_permutation(quantized):
    out, _ = quantized
    _, layers = checkpoint.read_layers(out)
    layer = next(iter(layers.values()))
    per_channel = inspection.channel_bits(layer, layer.k)  # one bin per channel: the exact width of each original channel
    widths = torch.cat([torch.full((s,), float(b)) for b, s in zip((4, 3, 2), layer.seg_k)])
    assert torch.equal(per_channel[layer.perm.long()], widths)


def test_loaded_model_matches_and_compiles(quantized):
    """torch.compile of a loaded quantized model runs the cmpq ops (fake impls) and matches eager."""
    out, _ = quantized
    model = load_quantized(out)
    assert sum(isinstance(m, CMPQLinear) for m in model.modules()) == 14
    ids = torch.randint(0, model.config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        eager = model(input_ids=ids, use_cache=False).logits
        compiled = torch.compile(model, fullgraph=False)(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("argv,message", [
    (["quantize", "--model", "{model}", "--bits", "4.5", "--calib", "{calib}", "--out", "{out}"], "bits"),
    (["quantize", "--model", "{model}", "--bits", "nan", "--calib", "{calib}", "--out", "{out}"], "bits"),
    (["quantize", "--model", "{model}", "--bits", "3", "--calib", "missing.txt", "--out", "{out}"], "missing.txt"),
    (["quantize", "--model", "{model}", "--bits", "3", "--calib", "{empty}", "--out", "{out}"], "empty"),
    (["quantize", "--model", "no/such-model", "--bits", "3", "--calib", "{calib}", "--out", "{out}"], "no/such-model"),
    (["quantize", "--model", "{model}", "--effective-bits", "3.5", "--calib", "{calib}", "--out", "{out}"],
     "k_proj: effective_bits 3.5 is below the minimum"),
    (["quantize", "--model", "{model}", "--bits", "3", "--effective-bits", "4.5", "--calib", "{calib}", "--out",
      "{out}"], "not both"),
    (["eval", "--model", "{model}", "--text", "missing.txt"], "missing.txt"),
    (["generate", "--model", "{model}", "--prompt", "x", "--max-new-tokens", "0"], "max_new_tokens"),
    (["inspect", "{model}"], "cmpq"),
])
def test_bad_input_is_one_clear_line(argv, message, model_dir, texts, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n", encoding="utf-8")
    fill = {"model": model_dir, "calib": texts[0], "out": str(tmp_path / "never"), "empty": str(empty)}
    status = cli.main([a.format(**fill) for a in argv])
    err = capsys.readouterr().err
    assert status == 2 and "error" in err and message in err
    assert not os.path.exists(fill["out"])


def test_quantize_to_an_effective_bit_budget(model_dir, texts, tmp_path):
    out, summary_path = str(tmp_path / "eff"), str(tmp_path / "eff.json")
    assert cli.main(["quantize", "--model", model_dir, "--effective-bits", "4.5", "--codebook-rows", "auto",
                     "--calib", texts[0], "--out", out, "--samples", "8", "--seq-len", "64",
                     "--json", summary_path]) == 0
    with open(summary_path, encoding="utf-8") as f:
        summary = json.load(f)
    assert summary["budget"] == "effective bits" and summary["bits"] == 4.5
    assert 4.49 <= summary["effective_bits"] <= 4.5
    with open(os.path.join(out, "config.json"), encoding="utf-8") as f:
        settings = json.load(f)["quantization_config"]["settings"]
    assert settings["effective_bits"] == 4.5 and settings["codebook_rows"] == "auto"


def test_quantize_refuses_existing_output(quantized, model_dir, texts, capsys):
    out, _ = quantized
    before = sorted(os.listdir(out))
    assert cli.main(["quantize", "--model", model_dir, "--calib", texts[0], "--out", out]) == 2
    assert "--overwrite" in capsys.readouterr().err and sorted(os.listdir(out)) == before


def test_bench_runs_the_cpu_benchmark_script(tmp_path, capsys):
    out = tmp_path / "quick"
    assert cli.main(["bench", "--device", "cpu", "--", "--quick", "--out", str(out)]) == 0
    assert (tmp_path / "quick.json").is_file() and "speedup" in capsys.readouterr().out
