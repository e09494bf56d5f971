"""Prompts as the run trained them, and greedy or sampled completions (``sample``, :class:`.adapters.AdapterSet`)."""

from __future__ import annotations

from typing import Any


def format_prompt(tokenizer: Any, fmt: str, prompt: str, inp: str = "") -> list[int]:
    """Token ids of ``prompt`` as the run's data format presented prompts in training (ftcluster.train.data)."""
    from .data import instruction_prompt

    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    if fmt == "chat":  # the template renders bos itself, as in data.chat_pieces
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    text = instruction_prompt(prompt, inp) if fmt == "instruction" else prompt
    return bos + list(tokenizer(text, add_special_tokens=False)["input_ids"])


def generate(model: Any, tokenizer: Any, ids: list[int], max_new_tokens: int, temperature: float, seed: int) -> str:
    import torch

    torch.manual_seed(seed)
    device = next(model.parameters()).device
    input_ids = torch.tensor([ids], device=device)
    kwargs: dict[str, Any] = {"do_sample": temperature > 0}
    if temperature > 0:
        kwargs["temperature"] = temperature
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), use_cache=True,
                             max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id, **kwargs)
    return tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)
