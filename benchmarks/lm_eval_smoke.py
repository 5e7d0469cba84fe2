"""lm-eval's ``local-completions`` against a running ``tandem serve``, on two small tasks defined
here, so nothing is downloaded: ``tandem_smoke`` (generation: 8 arithmetic questions, exact match)
and ``tandem_mc`` (loglikelihood: 16 four-way multiple-choice questions, accuracy: lm-eval sends
``echo=True, logprobs=1, max_tokens=1`` with token-id prompts and reads the prompt's logprobs).
``--hf CHECKPOINT`` runs the same task with lm-eval's ``hf`` backend (transformers' own model) for
comparison.

    tandem serve --model /path/to/ckpt --served-model-name tiny &
    python3 scripts/lm_eval_smoke.py --url http://127.0.0.1:8000 --model tiny [--api-key KEY] [--task tandem_mc]
    python3 scripts/lm_eval_smoke.py --hf /path/to/ckpt --task tandem_mc

lm-eval probes /tokenizer_info and /tokenize and then tokenizes on the server's side (its "remote"
tokenizer backend), so no tokenizer needs to be found locally. Needs ``pip install "lm-eval[api]"``.
The task and its data are written to a temporary folder (lm-eval resolves ``data_files`` against the
working directory, so the YAML names the data file by its absolute path). Prints lm-eval's table;
``--output`` keeps its results and samples."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

QUESTIONS = [(1, 2), (2, 2), (3, 4), (10, 5), (7, 7), (6, 3), (9, 1), (4, 4)]

TASK_YAML = """\
task: tandem_smoke
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 8
  do_sample: false
  temperature: 0.0
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


MC_TASK_YAML = """\
task: tandem_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""

MC_WORDS = ["fox", "dog", "cat", "sea", "moon", "river", "tree", "bird", "park", "mat", "time", "step"]


def write_tasks(folder: Path) -> None:
    data = folder / "tandem_smoke.jsonl"
    data.write_text("".join(json.dumps({"question": f"What is {a} plus {b}?", "answer": str(a + b)}) + "\n"
                            for a, b in QUESTIONS))
    (folder / "tandem_smoke.yaml").write_text(TASK_YAML.format(data=data))
    mc = folder / "tandem_mc.jsonl"
    rows = [{"question": f"The quick brown {MC_WORDS[i % 12]} jumps over the lazy",
             "choices": [" " + MC_WORDS[(i + j) % 12] for j in range(4)], "label": i % 4} for i in range(16)]
    mc.write_text("".join(json.dumps(row) + "\n" for row in rows))
    (folder / "tandem_mc.yaml").write_text(MC_TASK_YAML.format(data=mc))


def _lm_eval(model_flags: list[str], task: str, output: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    tasks = output / "task"
    tasks.mkdir(parents=True, exist_ok=True)
    write_tasks(tasks)
    cmd = [sys.executable, "-m", "lm_eval", *model_flags, "--tasks", task, "--include_path", str(tasks),
           "--output_path", str(output / "results"), "--log_samples"]
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", **env)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def run(url: str, model: str, api_key: str | None, output: Path, task: str = "tandem_smoke") -> subprocess.CompletedProcess:
    """Run lm-eval (its CLI, as a user would) against the server and return the finished process."""
    base_url = url.rstrip("/") + "/v1/completions"
    flags = ["--model", "local-completions", "--model_args",
             f"model={model},base_url={base_url},num_concurrent=4,max_retries=1"]
    return _lm_eval(flags, task, output, {"OPENAI_API_KEY": api_key or "EMPTY"})


def run_hf(checkpoint: Path, output: Path, task: str = "tandem_mc") -> subprocess.CompletedProcess:
    """The same task with lm-eval's transformers backend, float32 on the CPU."""
    flags = ["--model", "hf", "--model_args", f"pretrained={checkpoint},dtype=float32", "--device", "cpu"]
    return _lm_eval(flags, task, output, {})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", help="the server's model name")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--task", default="tandem_smoke", choices=["tandem_smoke", "tandem_mc"])
    parser.add_argument("--hf", type=Path, default=None, help="run the task with transformers on this checkpoint")
    parser.add_argument("--output", type=Path, default=None, help="keep lm-eval's results here")
    args = parser.parse_args()
    if args.hf is None and args.model is None:
        parser.error("give --model (the server's model name) or --hf CHECKPOINT")
    with tempfile.TemporaryDirectory() as tmp:
        out = args.output or Path(tmp)
        done = (run_hf(args.hf, out, args.task) if args.hf else run(args.url, args.model, args.api_key, out, args.task))
    print(done.stdout)
    if done.returncode:
        print(done.stderr[-4000:], file=sys.stderr)
    return done.returncode


if __name__ == "__main__":
    sys.exit(main())
