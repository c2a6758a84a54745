"""transformers ``from_pretrained`` on CMPQ checkpoints (``cmpq_kernels.hf``): same model as ``load_quantized``."""
from __future__ import annotations

import json
import os

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

import cmpq_kernels  # noqa: E402
import cmpq_kernels.hf  # noqa: E402,F401  (registers quant_method "cmpq")
from cmpq_kernels import CMPQLinear  # noqa: E402
from cmpq_kernels.shards import sha256_of  # noqa: E402

VOCAB = 256
# name -> (LlamaConfig overrides, quantize_model options)
CASES = {
    "untied": (dict(tie_word_embeddings=False, dtype="float32"), {}),  # the others leave config.json without dtype
    "tied": (dict(tie_word_embeddings=True), {}),
    "bias": (dict(attention_bias=True, mlp_bias=True), {}),
    # lm_head quantized while config.json still says tie_word_embeddings, and the first floating tensor in the
    # file is an fp16 codebook (lm_head.cmpq.codebook2) while config.json has no dtype.
    "lm_head": (dict(tie_word_embeddings=True), dict(quantize_lm_head=True)),
    # lm_head shares embed_tokens' storage though the config does not tie them: save_quantized records the alias
    # in quantization_config.tied and transformers' own tying does not cover it.
    "shared": (dict(tie_word_embeddings=False), dict(share_head=True)),
}


def tiny_llama(**overrides) -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=256, **overrides)
    return transformers.LlamaForCausalLM(cfg).eval()


def logits(model: nn.Module) -> torch.Tensor:
    x = torch.randint(0, VOCAB, (2, 48), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        return model(input_ids=x).logits


def quantized_names(model: nn.Module) -> list[str]:
    return sorted(n for n, m in model.named_modules() if isinstance(m, CMPQLinear))


_BUILT: dict = {}


def build(case: str, tmp_path_factory) -> tuple:
    """(directory, logits of the quantized model it was saved from), quantized once per case per session."""
    if case not in _BUILT:
        overrides, options = CASES[case]
        model = tiny_llama(**overrides)
        options = dict(options)
        if options.pop("share_head", False):
            model.lm_head.weight = model.model.embed_tokens.weight
        tokens = [torch.randint(0, VOCAB, (4096,), generator=torch.Generator().manual_seed(1))]
        cmpq_kernels.quantize_model(model, tokens, 3.0, n_samples=8, seq_len=64, progress=False, **options)
        directory = tmp_path_factory.mktemp(case) / "ck"
        cmpq_kernels.save_quantized(model, directory)
        _BUILT[case] = (directory, logits(model))
    return _BUILT[case]


@pytest.fixture(params=sorted(CASES))
def checkpoint(request, tmp_path_factory):
    return build(request.param, tmp_path_factory)


@pytest.fixture
def tied_checkpoint(tmp_path_factory):
    return build("tied", tmp_path_factory)[0]


def test_from_pretrained_gives_the_load_quantized_model(checkpoint):
    directory, ref = checkpoint
    model, info = transformers.AutoModelForCausalLM.from_pretrained(directory, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    direct = cmpq_kernels.load_quantized(directory)
    assert quantized_names(model) == quantized_names(direct) and quantized_names(model)
    config = json.loads((directory / "config.json").read_text())
    assert quantized_names(model) == sorted(config["quantization_config"]["modules"])
    ours, theirs = model.state_dict(), direct.state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert ours[key].dtype == theirs[key].dtype and torch.equal(ours[key], theirs[key]), key
    assert not model.training
    out = logits(model)
    assert torch.equal(out, ref) and torch.equal(out, logits(direct))
    assert model.config.quantization_config.to_dict() == config["quantization_config"]


def test_tied_embeddings_stay_tied(tied_checkpoint):
    config = json.loads((tied_checkpoint / "config.json").read_text())
    assert config["quantization_config"]["tied"] == {"lm_head.weight": "model.embed_tokens.weight"}
    model = transformers.AutoModelForCausalLM.from_pretrained(tied_checkpoint)
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_dtype_argument_casts_like_model_to(checkpoint):
    """from_pretrained(dtype=bf16) == load_quantized(...).to(bf16): float weights cast, packed tensors untouched."""
    directory, _ = checkpoint
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16)
    direct = cmpq_kernels.load_quantized(directory).to(torch.bfloat16)
    ours, theirs = model.state_dict(), direct.state_dict()
    for key in ours:
        assert ours[key].dtype == theirs[key].dtype and torch.equal(ours[key], theirs[key]), key
    # Non-persistent buffers (RoPE inv_freq) are not ours: from_pretrained(dtype=) keeps them FP32 where .to() casts
    # them, for any transformers model. Give the reference the same ones, then the outputs must agree exactly.
    for name, buf in model.named_buffers():
        if name not in ours:
            module, _, leaf = name.rpartition(".")
            direct.get_submodule(module)._buffers[leaf] = buf.clone()
    assert torch.equal(logits(model), logits(direct))


def test_save_quantized_of_a_from_pretrained_model_round_trips(checkpoint, tmp_path):
    directory, ref = checkpoint
    model = transformers.AutoModelForCausalLM.from_pretrained(directory)
    cmpq_kernels.save_quantized(model, tmp_path / "again")
    assert torch.equal(logits(cmpq_kernels.load_quantized(tmp_path / "again")), ref)


def test_save_pretrained_points_to_save_quantized(tied_checkpoint, tmp_path):
    model = transformers.AutoModelForCausalLM.from_pretrained(tied_checkpoint)
    with pytest.raises(NotImplementedError, match="cmpq_kernels.save_quantized"):
        model.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()


def copy_checkpoint(src, dst):
    dst.mkdir()
    for name in os.listdir(src):
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


@pytest.mark.parametrize("damage", ["header byte", "data byte", "truncated"])
@pytest.mark.parametrize("config_dtype", [False, True], ids=["no-config-dtype", "config-dtype"])
def test_damaged_file_is_refused(tied_checkpoint, tmp_path, damage, config_dtype):
    """Without a dtype in config.json transformers would parse the header itself (dtype="auto"): still our error."""
    directory = copy_checkpoint(tied_checkpoint, tmp_path / "ck")
    if config_dtype:
        config = json.loads((directory / "config.json").read_text())
        config["dtype"] = "float32"
        (directory / "config.json").write_text(json.dumps(config))
    path = directory / "model.safetensors"
    data = bytearray(path.read_bytes())
    if damage == "truncated":
        del data[len(data) // 2:]
    else:
        data[10 if damage == "header byte" else len(data) - 100] ^= 0x20
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="SHA-256 does not match"):
        transformers.AutoModelForCausalLM.from_pretrained(directory)


def rewrite(directory, edit):
    """Apply ``edit(tensors)`` to the weights and record the new file's SHA-256, as a careful forger would."""
    from safetensors.torch import load_file, save_file

    path = directory / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})
    config = json.loads((directory / "config.json").read_text())
    config["quantization_config"]["weights_sha256"] = sha256_of(str(path))
    (directory / "config.json").write_text(json.dumps(config))


def test_invalid_layer_with_matching_hash_fails_validation(tied_checkpoint, tmp_path):
    directory = copy_checkpoint(tied_checkpoint, tmp_path / "ck")
    name = "model.layers.0.mlp.down_proj.cmpq.perm"

    def duplicate_channel(tensors):
        tensors[name][1] = tensors[name][0]

    rewrite(directory, duplicate_channel)
    with pytest.raises(ValueError, match="model.layers.0.mlp.down_proj: perm: is not a permutation"):
        transformers.AutoModelForCausalLM.from_pretrained(directory)


def test_missing_or_stray_tensors_are_refused(tied_checkpoint, tmp_path):
    directory = copy_checkpoint(tied_checkpoint, tmp_path / "missing")
    rewrite(directory, lambda t: t.pop("model.layers.1.self_attn.o_proj.cmpq.codebook3"))
    with pytest.raises(ValueError, match="o_proj: tensors missing from the checkpoint: codebook3"):
        transformers.AutoModelForCausalLM.from_pretrained(directory)

    directory = copy_checkpoint(tied_checkpoint, tmp_path / "stray")
    rewrite(directory, lambda t: t.update({"model.layers.0.extra.cmpq.perm": torch.zeros(4, dtype=torch.int32)}))
    with pytest.raises(ValueError, match="not in quantization_config: model.layers.0.extra.cmpq.perm"):
        transformers.AutoModelForCausalLM.from_pretrained(directory)


def test_unquantized_model_with_cmpq_config_is_refused(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "fp")
    with pytest.raises(ValueError, match="pre-quantized"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "fp",
                                                          quantization_config=cmpq_kernels.hf.CMPQConfig())


def test_register_is_idempotent():
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

    cmpq_kernels.hf.register()
    cmpq_kernels.hf.register()
    assert AUTO_QUANTIZATION_CONFIG_MAPPING["cmpq"] is cmpq_kernels.hf.CMPQConfig
    assert AUTO_QUANTIZER_MAPPING["cmpq"] is cmpq_kernels.hf.CMPQHfQuantizer
