"""lm-eval's ``local-completions`` against a running ``tandem serve``, on a small generation task
defined here (8 arithmetic questions, exact match): nothing is downloaded.

    tandem serve --model /path/to/ckpt --served-model-name tiny &
    python3 scripts/lm_eval_smoke.py --url http://127.0.0.1:8000 --model tiny [--api-key KEY]

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


def write_task(folder: Path) -> None:
    data = folder / "tandem_smoke.jsonl"
    data.write_text("".join(json.dumps({"question": f"What is {a} plus {b}?", "answer": str(a + b)}) + "\n"
                            for a, b in QUESTIONS))
    (folder / "tandem_smoke.yaml").write_text(TASK_YAML.format(data=data))


def run(url: str, model: str, api_key: str | None, output: Path) -> subprocess.CompletedProcess:
    """Run lm-eval (its CLI, as a user would) and return the finished process."""
    tasks = output / "task"
    tasks.mkdir(parents=True, exist_ok=True)
    write_task(tasks)
    base_url = url.rstrip("/") + "/v1/completions"
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", OPENAI_API_KEY=api_key or "EMPTY")
    cmd = [sys.executable, "-m", "lm_eval", "--model", "local-completions",
           "--model_args", f"model={model},base_url={base_url},num_concurrent=4,max_retries=1",
           "--tasks", "tandem_smoke", "--include_path", str(tasks), "--output_path", str(output / "results"),
           "--log_samples"]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", required=True, help="the server's model name")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--output", type=Path, default=None, help="keep lm-eval's results here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        done = run(args.url, args.model, args.api_key, args.output or Path(tmp))
    print(done.stdout)
    if done.returncode:
        print(done.stderr[-4000:], file=sys.stderr)
    return done.returncode


if __name__ == "__main__":
    sys.exit(main())
