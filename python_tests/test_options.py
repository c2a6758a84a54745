"""QuantOptions: the one place quantizer settings are named, defaulted, validated and serialised."""
from __future__ import annotations

import json

import pytest
import torch

from cmpq_kernels import QuantOptions, quantize_linear
from cmpq_kernels.cli import build_parser
from cmpq_kernels.quantize import quantize_weight


def test_json_round_trip_and_settings_keys():
    options = QuantOptions(allocator="cmpq", codebook_rows=1, p_err=0.0, error_feedback=False)
    data = json.loads(json.dumps(options.to_json()))
    assert set(data) == set(QuantOptions.names())
    assert QuantOptions.from_json({**data, "calibration": {"samples": 8}}) == options


@pytest.mark.parametrize("overrides,match", [
    (dict(allocator="random"), "allocator must be one of"),
    (dict(budget="model"), "budget must be one of"),
    (dict(budget="global", allocator="cmpq"), "needs allocator='greedy'"),
    (dict(codebook_rows=0), "codebook_rows must be an integer >= 1"),
    (dict(codebook_rows=2.0), "codebook_rows must be an integer >= 1"),
    (dict(kmeans_iters=True), "kmeans_iters must be an integer >= 1"),
    (dict(p_act=1.0), r"p_act must be a fraction in \[0, 1\)"),
    (dict(p_err=float("nan")), "p_err must be a fraction"),
    (dict(error_feedback=1), "error_feedback must be True or False"),
    (dict(feedback_order="random"), "feedback_order must be one of"),
])
def test_invalid_values_name_the_option(overrides, match):
    with pytest.raises(ValueError, match=match):
        QuantOptions(**overrides)


def test_unknown_option_is_a_type_error_everywhere():
    w, s2 = torch.randn(8, 64), torch.ones(64)
    with pytest.raises(TypeError, match=r"unknown quantizer option\(s\) \['codebook_row'\]"):
        quantize_weight(w, s2, 3.0, codebook_row=2)
    with pytest.raises(TypeError, match="unknown quantizer option"):
        quantize_linear(torch.nn.Linear(64, 8), 3.0, torch.randn(16, 64), bogus=1)
    with pytest.raises(TypeError, match="options must be a QuantOptions"):
        quantize_weight(w, s2, 3.0, {"allocator": "cmpq"})


def test_options_object_and_overrides_combine():
    w, s2 = torch.randn(8, 64), torch.rand(64)
    layer = quantize_weight(w, s2, 3.0, QuantOptions(codebook_rows=2), p_err=0.0, p_act=0.0)
    assert layer.codebook_rows == 2 and layer.nnz == 0


def test_cli_defaults_come_from_the_options():
    args = build_parser().parse_args(["quantize", "--model", "m", "--calib", "c", "--out", "o"])
    defaults = QuantOptions()
    assert (args.allocator, args.budget, args.codebook_rows, not args.no_error_feedback) == \
        (defaults.allocator, defaults.budget, defaults.codebook_rows, defaults.error_feedback)
