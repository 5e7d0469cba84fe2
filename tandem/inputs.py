"""Prompt types of the offline API, vLLM's: ``LLM.generate`` takes a string, a ``TextPrompt``
(``{"prompt": text}``), a ``TokensPrompt`` (``{"prompt_token_ids": ids}``, optionally with the text
they came from, reported back as the output's prompt), a list of token ids, or a list of any of these.
Keys vLLM knows that tandem cannot honour (multimodal data, token type ids, cache salts) are refused
by name; unknown keys are refused too."""
from __future__ import annotations

from typing import Any, TypedDict, Union

from typing_extensions import NotRequired

#: keys of vLLM's prompt dicts that tandem refuses, with the reason
UNSUPPORTED = {
    "multi_modal_data": "tandem runs text-only models",
    "mm_processor_kwargs": "tandem runs text-only models",
    "token_type_ids": "tandem runs decoder-only models (no token type ids)",
    "cache_salt": "tandem's prefix cache takes no per-request salt",
}


class TextPrompt(TypedDict):
    prompt: str


class TokensPrompt(TypedDict):
    prompt_token_ids: list[int]
    prompt: NotRequired[str]  # the text the ids came from: the output's ``prompt`` (not re-tokenized)


PromptType = Union[str, TextPrompt, TokensPrompt, list[int]]


def parse_prompt(prompt: Any) -> tuple[str | None, list[int] | None]:
    """(text, token ids) of one prompt; ids win where both are given (the text is only reported)."""
    if isinstance(prompt, str):
        return prompt, None
    if isinstance(prompt, dict):
        return _parse_dict(prompt)
    if isinstance(prompt, (list, tuple)):
        return None, list(prompt)
    raise ValueError(f"a prompt must be a string, a list of token ids, a TextPrompt or a TokensPrompt dict, "
                     f"got {type(prompt).__name__}")


def _parse_dict(prompt: dict[str, Any]) -> tuple[str | None, list[int] | None]:
    refused = [k for k in prompt if k in UNSUPPORTED]
    if refused:
        raise ValueError(f"prompt key {refused[0]!r} is not supported: {UNSUPPORTED[refused[0]]}")
    unknown = sorted(set(prompt) - {"prompt", "prompt_token_ids"})
    if unknown:
        raise ValueError(f"unknown prompt key(s) {unknown}; a prompt dict has 'prompt' (TextPrompt) or "
                         "'prompt_token_ids' (TokensPrompt)")
    text, ids = prompt.get("prompt"), prompt.get("prompt_token_ids")
    if text is None and ids is None:
        raise ValueError("a prompt dict needs 'prompt' (TextPrompt) or 'prompt_token_ids' (TokensPrompt)")
    if text is not None and not isinstance(text, str):
        raise ValueError(f"a prompt dict's 'prompt' must be a string, got {type(text).__name__}")
    if ids is not None and not isinstance(ids, (list, tuple)):
        raise ValueError(f"'prompt_token_ids' must be a list of ints, got {type(ids).__name__}")
    return text, None if ids is None else list(ids)


def parse_prompts(prompts: Any) -> list[tuple[str | None, list[int] | None]]:
    """One prompt or a list of them; a flat list of ints is one token prompt (vLLM's reading)."""
    if isinstance(prompts, (str, dict)):
        return [parse_prompt(prompts)]
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError("prompts must be a prompt (a string, a TextPrompt or TokensPrompt dict, a list of token "
                         "ids) or a non-empty list of them")
    if all(isinstance(p, int) and not isinstance(p, bool) for p in prompts):
        return [(None, list(prompts))]
    return [parse_prompt(p) for p in prompts]
