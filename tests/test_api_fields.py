"""No request field silently ignored (issue 23, point 5): every request field of OpenAI's and vLLM's
completion and chat schemas is either implemented (the test that shows it is named here) or refused
with a 400 naming it (the value that proves it is given here; the field's neutral value passes).

OpenAI's fields are read from the installed ``openai`` package's typed request parameters. vLLM is not
installed: its fields are written down below from its documentation of the OpenAI-compatible server
(the completions and chat request models' sampling and extra parameters, and the fields they have had:
the older ``guided_*`` family beside today's ``structured_outputs``)."""
from __future__ import annotations

import ast
import typing
from pathlib import Path

import httpx
import pytest
from openai.types import completion_create_params as openai_completion
from openai.types.chat import ChatCompletionStreamOptionsParam
from openai.types.chat import completion_create_params as openai_chat

from server_utils import SERVER_KEY
from tandem.server.constraints import StructuredOutputs
from tandem.server.protocol import ChatCompletionRequest, CompletionRequest, StreamOptions

TESTS = Path(__file__).parent
AUTH = {"Authorization": f"Bearer {SERVER_KEY}"}


def _openai_fields(module) -> set[str]:
    return set(typing.get_type_hints(module.CompletionCreateParamsNonStreaming)) | set(
        typing.get_type_hints(module.CompletionCreateParamsStreaming))


OPENAI_COMPLETION = _openai_fields(openai_completion)
OPENAI_CHAT = _openai_fields(openai_chat)
OPENAI_STREAM_OPTIONS = set(typing.get_type_hints(ChatCompletionStreamOptionsParam))

# vLLM's documented request fields (its protocol's "sampling params" and "extra params" sections)
_VLLM_SHARED = {
    "model", "frequency_penalty", "logit_bias", "n", "presence_penalty", "seed", "stop", "stream",
    "stream_options", "temperature", "top_p", "user", "best_of", "use_beam_search", "top_k", "min_p",
    "repetition_penalty", "length_penalty", "stop_token_ids", "include_stop_str_in_output", "ignore_eos",
    "min_tokens", "skip_special_tokens", "spaces_between_special_tokens", "truncate_prompt_tokens",
    "allowed_token_ids", "prompt_logprobs", "echo", "add_special_tokens", "response_format",
    "structured_outputs", "guided_json", "guided_regex", "guided_choice", "guided_grammar",
    "guided_decoding_backend", "guided_whitespace_pattern", "structural_tag", "priority", "request_id",
    "logits_processors", "return_tokens_as_token_ids", "return_token_ids", "cache_salt", "kv_transfer_params",
    "vllm_xargs", "logprobs", "max_tokens", "bad_words"}
VLLM_COMPLETION = _VLLM_SHARED | {
    "prompt", "suffix", "prompt_embeds", "max_repetition_pattern_size", "min_repetition_pattern_size",
    "repetition_min_count"}
VLLM_CHAT = _VLLM_SHARED | {
    "messages", "top_logprobs", "max_completion_tokens", "tools", "tool_choice", "reasoning_effort",
    "thinking_token_budget", "include_reasoning", "parallel_tool_calls", "watermarking", "truncation_side",
    "logprob_token_ids", "add_generation_prompt", "continue_final_message", "documents", "chat_template",
    "chat_template_kwargs", "media_io_kwargs", "mm_processor_kwargs", "session_id", "routed_experts_prompt_start",
    "return_token_offsets", "return_prompt_text", "return_mm_kwargs", "ec_transfer_params", "repetition_detection",
    "stream_interval"}
VLLM_STREAM_OPTIONS = {"include_usage", "continuous_usage_stats"}
VLLM_STRUCTURED_OUTPUTS = {"json", "regex", "choice", "grammar", "json_object", "disable_fallback",
                           "disable_any_whitespace", "disable_additional_properties", "whitespace_pattern",
                           "structural_tag"}

# --- implemented: the test that shows each (module::function) ---------------------------------------
_SERVER = "test_server.py::"
_FIELDS = "test_server_fields.py::"
_SAMPLING = "test_server_sampling.py::"
_CONSTRAINED = "test_server_constraints.py::"
_TOOLS = "test_chat_parsing_server.py::"
SHARED_IMPLEMENTED = {
    "model": _SERVER + "test_unknown_model_is_404", "n": _SERVER + "test_n_samples_count_the_prompt_once",
    "temperature": _SERVER + "test_completion_matches_offline_with_exact_usage",
    "seed": _SERVER + "test_n_samples_count_the_prompt_once", "stop": _SERVER + "test_stop_strings_and_stop_token_ids",
    "stop_token_ids": _SERVER + "test_stop_strings_and_stop_token_ids",
    "include_stop_str_in_output": _SERVER + "test_stop_strings_and_stop_token_ids",
    "stream": _SERVER + "test_streamed_text_equals_non_streamed",
    "stream_options": _SERVER + "test_streamed_text_equals_non_streamed",
    "ignore_eos": _SERVER + "test_completion_matches_offline_with_exact_usage",
    "top_p": _FIELDS + "test_top_k_top_p_min_p_min_tokens_match_offline",
    "top_k": _FIELDS + "test_top_k_top_p_min_p_min_tokens_match_offline",
    "min_p": _FIELDS + "test_top_k_top_p_min_p_min_tokens_match_offline",
    "min_tokens": _FIELDS + "test_top_k_top_p_min_p_min_tokens_match_offline",
    "presence_penalty": _SAMPLING + "test_penalties_and_logit_bias_reach_the_engine",
    "frequency_penalty": _SAMPLING + "test_penalties_and_logit_bias_reach_the_engine",
    "repetition_penalty": _SAMPLING + "test_penalties_and_logit_bias_reach_the_engine",
    "logit_bias": _SAMPLING + "test_penalties_and_logit_bias_reach_the_engine",
    "skip_special_tokens": _FIELDS + "test_skip_special_tokens",
    "logprobs": _SAMPLING + "test_completion_logprobs_streamed_equal_non_streamed",
    "max_tokens": _SERVER + "test_completion_matches_offline_with_exact_usage",
    "user": _FIELDS + "test_informational_fields_are_accepted",
    "safety_identifier": _FIELDS + "test_informational_fields_are_accepted",
    "metadata": _FIELDS + "test_informational_fields_are_accepted",
    "prompt_cache_key": _FIELDS + "test_informational_fields_are_accepted",
    "session_id": _FIELDS + "test_informational_fields_are_accepted",
    "echo": _FIELDS + "test_echo_with_max_tokens_zero_scores_the_prompt",
    "bad_words": _FIELDS + "test_allowed_token_ids_and_bad_words", "allowed_token_ids": _FIELDS +
    "test_allowed_token_ids_and_bad_words", "prompt_logprobs": _FIELDS + "test_prompt_logprobs_match_offline",
    "truncate_prompt_tokens": _FIELDS + "test_truncate_prompt_tokens", "truncation_side": _FIELDS +
    "test_truncate_prompt_tokens", "return_tokens_as_token_ids": _FIELDS + "test_return_tokens_as_token_ids",
    "return_token_ids": _FIELDS + "test_return_token_ids_and_stop_reason_streamed_and_whole",
    "request_id": _FIELDS + "test_request_id_names_the_response", "add_special_tokens": _FIELDS +
    "test_add_special_tokens", "response_format": _CONSTRAINED + "test_each_constraint_field_reaches_the_engine",
    "structured_outputs": _CONSTRAINED + "test_each_constraint_field_reaches_the_engine",
    "guided_json": _CONSTRAINED + "test_each_constraint_field_reaches_the_engine",
    "guided_regex": _CONSTRAINED + "test_each_constraint_field_reaches_the_engine",
    "guided_choice": _CONSTRAINED + "test_each_constraint_field_reaches_the_engine",
    "guided_grammar": _CONSTRAINED + "test_each_constraint_field_reaches_the_engine",
    "guided_decoding_backend": _CONSTRAINED + "test_each_constraint_field_reaches_the_engine",
    "structural_tag": _CONSTRAINED + "test_structural_tags_reach_the_engine_and_shape_the_output",
}
COMPLETION_IMPLEMENTED = {**SHARED_IMPLEMENTED, "prompt": _SERVER + "test_token_id_and_batched_prompts"}
CHAT_IMPLEMENTED = {
    **SHARED_IMPLEMENTED, "messages": _SERVER + "test_chat_completion_uses_the_chat_template",
    "max_completion_tokens": _SERVER + "test_chat_completion_uses_the_chat_template",
    "top_logprobs": _SAMPLING + "test_chat_top_logprobs", "echo": _FIELDS + "test_chat_echo_and_continue_final_message",
    "add_generation_prompt": _FIELDS + "test_add_generation_prompt",
    "continue_final_message": _FIELDS + "test_chat_echo_and_continue_final_message",
    "documents": _FIELDS + "test_chat_template_kwargs_and_documents_reach_the_template",
    "chat_template": _FIELDS + "test_chat_template_kwargs_and_documents_reach_the_template",
    "chat_template_kwargs": _FIELDS + "test_chat_template_kwargs_and_documents_reach_the_template",
    "return_prompt_text": _FIELDS + "test_chat_echo_and_continue_final_message",
    "service_tier": _FIELDS + "test_informational_fields_are_accepted",
    "modalities": _FIELDS + "test_informational_fields_are_accepted",
    "tools": _TOOLS + "test_auto_tool_calls_in_the_response_and_the_stream",
    "tool_choice": _TOOLS + "test_required_and_named_tool_choice",
    "parallel_tool_calls": _TOOLS + "test_parallel_tool_calls_false_keeps_one_call",
    "include_reasoning": _TOOLS + "test_include_reasoning_false_and_a_malformed_call_left_as_content"}
STREAM_OPTIONS_IMPLEMENTED = {"include_usage": _SERVER + "test_usage_is_streamed_only_when_asked",
                              "continuous_usage_stats": _FIELDS + "test_continuous_usage_stats"}
STRUCTURED_IMPLEMENTED = {kind: _CONSTRAINED + "test_each_constraint_field_reaches_the_engine"
                          for kind in ("json", "regex", "choice", "grammar", "json_object", "disable_any_whitespace")}
STRUCTURED_IMPLEMENTED["structural_tag"] = _CONSTRAINED + "test_structural_tags_reach_the_engine_and_shape_the_output"

# --- refused: a value other than the neutral one, which must get a 400 naming the field --------------
SHARED_REFUSED = {
    "best_of": 2, "use_beam_search": True, "length_penalty": 0.5, "spaces_between_special_tokens": False,
    "priority": 1, "logits_processors": ["my.Processor"], "cache_salt": "salt", "kv_transfer_params": {"a": 1},
    "vllm_xargs": {"a": 1}, "guided_whitespace_pattern": " "}
COMPLETION_REFUSED = {**SHARED_REFUSED, "suffix": "the end", "prompt_embeds": "AAAA",
                      "max_repetition_pattern_size": 2, "min_repetition_pattern_size": 2, "repetition_min_count": 2}
CHAT_REFUSED = {
    **SHARED_REFUSED, "audio": {"voice": "alloy", "format": "wav"}, "function_call": "auto",
    "functions": [{"name": "f"}], "moderation": {"model": "x"},
    "prediction": {"type": "content", "content": "x"}, "prompt_cache_options": {"a": 1},
    "prompt_cache_retention": "24h", "reasoning_effort": "low", "store": True, "verbosity": "low",
    "web_search_options": {}, "thinking_token_budget": 10, "watermarking": True, "logprob_token_ids": [1],
    "media_io_kwargs": {"image": {}}, "mm_processor_kwargs": {"a": 1}, "ec_transfer_params": {"a": 1},
    "routed_experts_prompt_start": 1, "return_token_offsets": True, "return_mm_kwargs": False,
    "repetition_detection": {"n": 2}, "stream_interval": 2}
STREAM_OPTIONS_REFUSED = {"include_obfuscation": True}
STRUCTURED_REFUSED = {"disable_fallback": True, "disable_additional_properties": True, "whitespace_pattern": " "}

ROUTES = {  # route: (the schemas' fields, implemented, refused, the request model, a minimal valid body)
    "/v1/completions": (OPENAI_COMPLETION | VLLM_COMPLETION, COMPLETION_IMPLEMENTED, COMPLETION_REFUSED,
                        CompletionRequest, {"model": "tiny", "prompt": "hi", "max_tokens": 1}),
    "/v1/chat/completions": (OPENAI_CHAT | VLLM_CHAT, CHAT_IMPLEMENTED, CHAT_REFUSED, ChatCompletionRequest,
                             {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}),
}


def _model_fields(model) -> set[str]:
    return {f.alias or name for name, f in model.model_fields.items()}


@pytest.mark.parametrize("route", ROUTES)
def test_every_field_of_both_schemas_is_known_and_classified_once(route):
    fields, implemented, refused, model, _ = ROUTES[route]
    classified = set(implemented) | set(refused)
    assert not set(implemented) & set(refused)
    assert fields <= classified, fields - classified
    # none falls to "unknown: ignored" (and what we classify beyond both lists is ours, known too)
    assert fields | classified <= _model_fields(model), (fields | classified) - _model_fields(model)
    for nested, listed, done, no in ((StreamOptions, OPENAI_STREAM_OPTIONS | VLLM_STREAM_OPTIONS,
                                      STREAM_OPTIONS_IMPLEMENTED, STREAM_OPTIONS_REFUSED),
                                     (StructuredOutputs, VLLM_STRUCTURED_OUTPUTS, STRUCTURED_IMPLEMENTED,
                                      STRUCTURED_REFUSED)):
        assert listed == set(done) | set(no) and listed <= _model_fields(nested), listed ^ (set(done) | set(no))


def _test_functions() -> dict[str, set[str]]:
    found = {}
    for path in TESTS.glob("test_*.py"):
        tree = ast.parse(path.read_text())
        found[path.name] = {n.name for n in tree.body if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")}
    return found


def test_each_implemented_field_names_a_test_that_exists():
    functions = _test_functions()
    markers = {**COMPLETION_IMPLEMENTED, **CHAT_IMPLEMENTED, **STREAM_OPTIONS_IMPLEMENTED, **STRUCTURED_IMPLEMENTED}
    missing = {field: where for field, where in markers.items()
               if where.split("::")[1] not in functions.get(where.split("::")[0], set())}
    assert not missing


def _post(server, route, body):
    return httpx.post(server.url + route, json=body, headers=AUTH, timeout=30)


@pytest.mark.parametrize("route", ROUTES)
def test_each_refused_field_gets_a_400_naming_it(server, route):
    _, _, refused, _, base = ROUTES[route]
    wrong = {}
    for field, value in refused.items():
        resp = _post(server, route, {**base, field: value})
        if resp.status_code != 400 or resp.json()["error"]["param"] != field:
            wrong[field] = (resp.status_code, resp.text[:200])
    nested = [("stream_options", {"stream": True, "stream_options": {k: v}}) for k, v in STREAM_OPTIONS_REFUSED.items()]
    nested += [("structured_outputs", {"structured_outputs": {"regex": "a", k: v}}) for k, v in STRUCTURED_REFUSED.items()]
    for field, extra in nested:
        resp = _post(server, route, {**base, **extra})
        if resp.status_code != 400 or resp.json()["error"]["param"] != field:
            wrong[f"{field}: {extra}"] = (resp.status_code, resp.text[:200])
    assert not wrong


NEUTRAL = {"best_of": 1, "use_beam_search": False, "length_penalty": 1.0, "spaces_between_special_tokens": True,
           "priority": 0, "vllm_xargs": {}, "suffix": "", "functions": [], "function_call": "none",
           "parallel_tool_calls": True, "store": False, "tools": [], "tool_choice": "none", "include_reasoning": True,
           "watermarking": False, "media_io_kwargs": {}, "mm_processor_kwargs": {}, "routed_experts_prompt_start": 0,
           "return_token_offsets": False, "return_mm_kwargs": True, "stream_interval": 1,
           "max_repetition_pattern_size": 0, "min_repetition_pattern_size": 0, "repetition_min_count": 0}


@pytest.mark.parametrize("route", ROUTES)
def test_the_neutral_values_and_nulls_of_refused_fields_are_accepted(server, route):
    _, _, refused, _, base = ROUTES[route]
    neutral = {k: v for k, v in NEUTRAL.items() if k in refused}
    resp = _post(server, route, {**base, **neutral})
    assert resp.status_code == 200, resp.text
    resp = _post(server, route, {**base, **dict.fromkeys(refused)})
    assert resp.status_code == 200, resp.text


@pytest.mark.parametrize("request_type", [CompletionRequest, ChatCompletionRequest])
def test_unknown_fields_are_ignored_but_logged_once(request_type, caplog):
    """A field in neither schema (clients such as LangChain send their own) is ignored, as vLLM
    does, and the server says so in its log: each distinct set of names once."""
    import logging

    body = {"model": "m", "prompt": "x"} if request_type is CompletionRequest else \
        {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    name = f"zz_unknown_{request_type.__name__}"
    with caplog.at_level(logging.WARNING, logger="tandem.server.protocol"):
        for _ in range(3):
            request_type.model_validate(body | {name: 1, "temperature": 0.5})
        request_type.model_validate(body)  # nothing unknown: nothing logged
    noted = [r.getMessage() for r in caplog.records if name in r.getMessage()]
    assert len(noted) == 1 and request_type.__name__ in noted[0] and "temperature" not in noted[0]
