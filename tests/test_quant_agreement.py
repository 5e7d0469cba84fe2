"""Issue 25's sanity bound measured where it means something: greedy agreement of FP8 and 4-bit weights
(quantized at load; on the CPU dequantized at load, so the weights still carry the rounding) with the
float32 original, on benchmarks/trained_tiny.py's model trained here (once per session, 75 steps: ~20 s
on two cores). Random-weight presets cannot show it: their flat logits reorder under rounding alone."""
import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import agreement  # noqa: E402
from benchmarks.trained_tiny import Corpus, load_corpus, train  # noqa: E402

# walks of 32 + 64 bytes: the length the model was trained on
COMMON = dict(device="cpu", dtype="float32", max_model_len=128)
REQUESTS, PROMPT, TOKENS = 8, 32, 64
# half the script's default: at 75 steps training seeds 0, 1 and 2 each followed the corpus, and FP8 and
# 4-bit agreed, on 100% of positions (final loss ~0.02); at 45 steps one fell to 85%
STEPS = 75


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train(tmp_path_factory.mktemp("trained_tiny"), seed=0, steps=STEPS)


@pytest.fixture(scope="module")
def ref(trained: Path) -> agreement.Reference:
    seed = random.randrange(1 << 30)  # fresh prompts each run; the seed is in every failure message
    print(f"prompt seed {seed}")
    return agreement.reference(str(trained), COMMON, REQUESTS, PROMPT, TOKENS, seed=seed)


def _rule(corpus: Corpus, prompt: list[int]) -> list[int]:
    """What the corpus says follows ``prompt`` (a walk from its first word)."""
    first = bytes(prompt).decode().split(" ")[0]
    return corpus.walk(corpus.words.index(first), PROMPT + TOKENS)[PROMPT:]


def test_the_model_learned_its_corpus(trained: Path, ref: agreement.Reference):
    corpus = load_corpus(trained)
    assert corpus is not None and corpus == Corpus.make(0)
    right = sum(a == b for p, out in zip(ref.prompts, ref.tokens) for a, b in zip(_rule(corpus, p), out))
    share = right / (REQUESTS * TOKENS)
    # 100% measured after STEPS steps; an untrained or mis-saved model gets a few percent
    assert share >= 0.9, f"greedy continuations follow the corpus on {share:.1%} of positions"
    print(f"greedy continuations follow the corpus on {share:.1%} of positions")


@pytest.mark.parametrize("quantization", ["fp8", "int4"])
def test_quantized_weights_keep_the_greedy_tokens(trained: Path, ref: agreement.Reference, quantization: str):
    got = agreement.measure(str(trained), dict(COMMON, quantization=quantization), ref)
    assert got.positions == REQUESTS * TOKENS
    assert got.free_running >= agreement.MIN_AGREEMENT, got.line(f"--quantization {quantization}", "float32")
    assert got.teacher_forced >= agreement.MIN_AGREEMENT, got.line(f"--quantization {quantization}", "float32")
    print(got.line(f"--quantization {quantization}", "float32"))


def test_the_control_differs_from_the_quantized_models_only_by_rounding(trained: Path, ref: agreement.Reference):
    # the float32 model at another batch size: the measurement itself, with no quantization
    got = agreement.measure(str(trained), dict(COMMON, max_num_seqs=3), ref)
    assert (got.free_running, got.teacher_forced) == (1.0, 1.0), got.line("float32 at max_num_seqs 3", "float32")


def test_the_command_line_keeps_a_trained_folder_within_its_trained_length(trained: Path, capsys):
    # without --prompt-len a trained_tiny folder gets 32-byte prompts: 32 + 64 bytes, as trained (the
    # presets' 256 would run the model past its training length, where it is unsure)
    assert agreement.main([str(trained), "--quantization", "fp8", "--requests", "2", "--dtype", "float32",
                           "--device", "cpu"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    free = float(line.split("free-running ")[1].split("%")[0]) / 100
    assert "over 128 positions" in line and free >= agreement.MIN_AGREEMENT, line  # 256-byte prompts: ~55%
