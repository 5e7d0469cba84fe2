"""Structured output on the host: grammars compiled off the step loop (``compiler``), one matcher per
request fed only the tokens the host has received (``matcher``), and each step's mask rows
(``manager``). The device applies the masks (``tandem.worker.grammar_mask``)."""
