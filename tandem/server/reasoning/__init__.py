"""Reasoning output: parsers of ``<think>`` formats (one module each, a registry by name) and the
streaming scanner they share, which splits a choice's text into ``reasoning_content`` and ``content``."""
from tandem.server.reasoning.base import ReasoningDelta, ReasoningParser, ReasoningStream, parse_reasoning
from tandem.server.reasoning.registry import REASONING_PARSERS, reasoning_parser

__all__ = ["REASONING_PARSERS", "ReasoningDelta", "ReasoningParser", "ReasoningStream", "parse_reasoning",
           "reasoning_parser"]
