"""How a request's prompts become token ids: a completion's text with or without the tokenizer's
special tokens, a conversation through the chat template with the request's options, and
``truncate_prompt_tokens`` (keep the last N tokens, or the first N with ``truncation_side: "right"``;
-1: the context's length). Also the chat fields that shape the response: the role written and the
echoed text."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tandem.server.errors import APIError
from tandem.server.protocol import ChatCompletionRequest, ChatMessage, ChatTemplateFields
from tandem.tokenizer import ChatOptions


@dataclass(frozen=True)
class Shaping:
    """What a request asks of its prompts' ids."""

    add_special_tokens: bool = True
    truncate: int | None = None  # keep this many tokens; -1: the context's length
    side: str = "left"  # "left": the start goes (the last tokens stay); "right": the end goes

    def apply(self, ids: list[int], max_model_len: int) -> tuple[list[int], bool]:
        """(ids, whether they were cut)."""
        keep = max_model_len if self.truncate == -1 else self.truncate
        if keep is None or len(ids) <= keep:
            return ids, False
        return (ids[len(ids) - keep:] if self.side == "left" else ids[:keep]), True


def shaping(body: Any) -> Shaping:
    return Shaping(body.add_special_tokens if body.add_special_tokens is not None else True,
                   body.truncate_prompt_tokens, body.truncation_side or "left")


def chat_options(body: ChatTemplateFields, trusted_templates: bool) -> ChatOptions:
    """The template options of a chat (or /tokenize) request, or a 400 naming the field."""
    if body.chat_template is not None and not trusted_templates:
        raise APIError(400, "chat_template: this server renders only its model's own chat template (start it "
                            "with --trust-request-chat-template to accept templates from requests)", "chat_template")
    add_prompt = body.add_generation_prompt
    if add_prompt and body.continue_final_message:
        raise APIError(400, "add_generation_prompt and continue_final_message cannot both be true: one opens a "
                            "new assistant turn, the other continues the last message", "continue_final_message")
    try:
        return ChatOptions(add_generation_prompt=not body.continue_final_message if add_prompt is None else add_prompt,
                           continue_final_message=body.continue_final_message, chat_template=body.chat_template,
                           documents=body.documents, template_kwargs=dict(body.chat_template_kwargs or {}))
    except ValueError as exc:
        raise APIError(400, str(exc), "chat_template_kwargs") from exc


def response_role(messages: list[ChatMessage], options: ChatOptions) -> str:
    """The role of the message the model writes: the assistant's after a generation prompt, else the
    role of the last message, which it continues (vLLM's rule)."""
    return "assistant" if options.add_generation_prompt else messages[-1].role


def echoed(body: ChatCompletionRequest, role: str) -> str:
    """Chat ``echo``: the last message's text leads the response when the response continues it."""
    last = body.messages[-1]
    return last.text if body.echo and last.role == role else ""
