"""Text generation with a (CMPQ or FP) causal LM, streaming tokens and timing them (tokens/s)."""
from __future__ import annotations

import math
import time
from typing import Any

import torch
from torch import nn


class _TimedStreamer:
    """Prints tokens as they arrive and records when each new token came (for decode tokens/s)."""

    def __init__(self, tokenizer: Any, echo: bool) -> None:
        from transformers import TextStreamer

        self.text = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if echo else None
        self.times: list[float] = []
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if self.prompt_seen:
            self.times.append(time.perf_counter())
        self.prompt_seen = True
        if self.text is not None:
            self.text.put(value)

    def end(self) -> None:
        if self.text is not None:
            self.text.end()


@torch.no_grad()
def generate(model: nn.Module, tokenizer: Any, prompt: str, max_new_tokens: int = 32, temperature: float = 0.0,
             top_p: float = 1.0, seed: int = 0, echo: bool = True) -> dict:
    """Greedy (``temperature == 0``) or sampled continuation of ``prompt``; returns text and timings.

    ``decode_tokens_per_s`` counts tokens after the first (the first includes the prompt's prefill);
    ``tokens_per_s`` is all new tokens over the whole call.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not (temperature >= 0 and math.isfinite(temperature)) or not 0 < top_p <= 1:
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
    device = next(model.parameters()).device
    inputs = tokenizer(prompt, return_tensors="pt").to(device)
    torch.manual_seed(seed)
    streamer = _TimedStreamer(tokenizer, echo)
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else \
        {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    start = time.perf_counter()
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, streamer=streamer,
                         pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id, **sampling)
    seconds = time.perf_counter() - start
    new = out[0, inputs["input_ids"].shape[1]:]
    decode = (len(streamer.times) - 1) / (streamer.times[-1] - streamer.times[0]) if len(streamer.times) > 1 else None
    return {"prompt": prompt, "text": tokenizer.decode(new, skip_special_tokens=True), "token_ids": new.tolist(),
            "new_tokens": int(new.numel()),
            "seconds": seconds, "tokens_per_s": new.numel() / seconds, "decode_tokens_per_s": decode}
