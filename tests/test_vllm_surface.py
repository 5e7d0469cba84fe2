"""vLLM's command-line surface (issue 26, point 1): each flag does what vLLM documents, and a vLLM-style
command line runs unchanged. Checkpoints come from tests/checkpoints.py; a fake Hugging Face cache (the
hub's folder layout, made here) stands for models already downloaded."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import httpx
import msgspec
import pytest

from tandem.cli import main, parse
from tandem.cli.options import cli_fields, from_namespace
from tandem.config import EngineConfig
from tandem.engine.core import CoreStats
from tandem.engine.scheduler import StepDeltas
from tandem.model.sources import local_model_path, read_chat_template
from tandem.server.messages import Stats, StepUpdate, output_decoder, output_encoder
from tandem.server.options import ServeOptions

COMMIT = "0123456789abcdef0123456789abcdef01234567"
OTHER = "fedcba9876543210fedcba9876543210fedcba98"
TEMPLATE = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}>>"


def fake_hub_cache(root: Path, repo: str, checkpoint: Path, refs: dict[str, str]) -> Path:
    """``root`` laid out as huggingface_hub's cache holding ``repo`` at each ref (name -> commit)."""
    repo_dir = root / ("models--" + repo.replace("/", "--"))
    for ref, commit in refs.items():
        shutil.copytree(checkpoint, repo_dir / "snapshots" / commit, dirs_exist_ok=True)
        (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
        (repo_dir / "refs" / ref).write_text(commit)
    return root


@pytest.fixture(scope="module")
def hub(checkpoint_dir, tmp_path_factory) -> Path:
    """A cache holding org/tiny at main and at tag v1 (another snapshot); main's generation_config.json
    sets vLLM-style request defaults: top_k 1 (deterministic whatever the seed), max_new_tokens 7."""
    root = tmp_path_factory.mktemp("hub")
    fake_hub_cache(root, "org/tiny", checkpoint_dir("llama"), {"main": COMMIT, "v1": OTHER})
    gen = root / "models--org--tiny" / "snapshots" / COMMIT / "generation_config.json"
    gen.write_text(json.dumps({**json.loads(gen.read_text()), "temperature": 0.7, "top_k": 1, "max_new_tokens": 7}))
    return root


# --- names: folders, cached hub ids, presets ---------------------------------------------------------
def test_hub_ids_resolve_offline_in_the_local_cache(hub, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    snapshots = hub / "models--org--tiny" / "snapshots"
    assert Path(local_model_path("org/tiny")) == snapshots / COMMIT
    assert Path(local_model_path("org/tiny", revision="v1")) == snapshots / OTHER
    assert Path(local_model_path("org/tiny", revision=OTHER)) == snapshots / OTHER  # a commit present
    monkeypatch.setenv("HF_HUB_CACHE", str(hub.parent / "elsewhere"))
    assert Path(local_model_path("org/tiny", download_dir=str(hub))) == snapshots / COMMIT  # --download-dir wins


def test_a_missing_hub_id_names_where_it_looked(hub, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    with pytest.raises(FileNotFoundError, match=f"looked in {hub / 'models--org--absent'}.*does not exist"):
        local_model_path("org/absent")
    with pytest.raises(FileNotFoundError, match="revision nope.*not downloaded"):
        local_model_path("org/tiny", revision="nope")
    with pytest.raises(FileNotFoundError, match="neither a local checkpoint folder"):
        local_model_path("./no/such/folder")


def test_revision_and_download_dir_are_refused_for_local_models(checkpoint_dir):
    with pytest.raises(ValueError, match="revision 'v1' applies to Hugging Face ids.*local folder"):
        local_model_path(str(checkpoint_dir("llama")), revision="v1")
    with pytest.raises(ValueError, match="download_dir .* applies to Hugging Face ids.*preset"):
        local_model_path("random:tiny", download_dir="/tmp")


def test_resolved_configs_hold_local_folders_and_template_text(hub, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    template_file = tmp_path / "t.jinja"
    template_file.write_text(TEMPLATE)
    config = EngineConfig(model="org/tiny", revision="v1", tokenizer="org/tiny", chat_template=str(template_file))
    resolved = config.resolved()
    assert Path(resolved.model).name == OTHER and Path(resolved.tokenizer).name == COMMIT
    assert resolved.chat_template == TEMPLATE and resolved.revision is None
    assert resolved.resolved() == resolved  # idempotent: the core process may resolve again
    assert read_chat_template("{{ messages }}") == "{{ messages }}"  # inline, as vLLM takes it
    with pytest.raises(FileNotFoundError, match="neither a file nor a Jinja template"):
        read_chat_template("missing.jinja")
    with pytest.raises(ValueError, match="byte tokenizer has a fixed chat format"):
        EngineConfig(model="random:tiny", chat_template=TEMPLATE).resolved()
    with pytest.raises(ValueError, match="max_logprobs must be in \\[0, 20\\]"):
        EngineConfig(model="random:tiny", max_logprobs=21)


# --- the command line ---------------------------------------------------------------------------------
def test_positional_model_logging_after_the_subcommand_and_model_conflicts():
    args = parse(["serve", "org/tiny", "--served-model-name", "a", "b", "-v"])
    assert args.model == "org/tiny" and args.served_model_name == ["a", "b"] and args.log_level == logging.INFO
    assert parse(["-v", "serve", "--model", "x"]).log_level == logging.INFO  # before it, as before
    assert parse(["serve", "x", "--log-level", "debug"]).log_level == logging.DEBUG
    assert parse(["serve", "x"]).log_level == logging.WARNING
    assert parse(["generate", "x"]).model == "x"  # over generate's default model
    assert parse(["generate", "x", "--model", "x"]).model == "x"
    with pytest.raises(ValueError, match="given twice"):
        parse(["serve", "x", "--model", "y"])


def test_a_yaml_config_file_sets_defaults_the_command_line_overrides(tmp_path, capsys):
    config = tmp_path / "config.yaml"
    config.write_text("model: random:tiny\nmax-model-len: 256\nmax_num_seqs: 4\nenforce-eager: true\n"
                      "served-model-name: [one, two]\nport: 0\ngeneration_config: vllm\n")
    args = parse(["serve", "--config", str(config), "--max-num-seqs", "8"])
    assert (args.model, args.max_model_len, args.max_num_seqs, args.enforce_eager) == ("random:tiny", 256, 8, True)
    assert args.served_model_name == ["one", "two"] and args.port == 0 and args.generation_config == "vllm"
    config.write_text("prompt: [a, b]\ntemperature: 0\n")  # tandem generate's own flags too
    args = parse(["generate", "random:tiny", "--config", str(config)])
    assert args.prompt == ["a", "b"] and args.temperature == 0.0
    config.write_text("max-model-len: 256\nno-such-option: 1\n")
    assert main(["serve", "--config", str(config)]) == 2
    assert "unknown option 'no-such-option'" in capsys.readouterr().err
    config.write_text("max-model-len: many\n")
    assert main(["serve", "--config", str(config)]) == 2
    assert "max-model-len: expected int, got 'many'" in capsys.readouterr().err
    config.write_text("enforce-eager: 1\n")
    assert main(["serve", "--config", str(config)]) == 2
    assert "must be true or false" in capsys.readouterr().err


def test_every_server_option_is_a_flag_checked_with_its_name(capsys):
    """The options list (ServeOptions) gives the flags, their defaults and their checks."""
    args = parse(["serve", "m", "--port", "0"])
    options = from_namespace(ServeOptions, args, log_level=args.log_level)
    assert options == ServeOptions(port=0)  # the flags' defaults are the list's
    with pytest.raises(SystemExit):
        parse(["serve", "--help"])
    help_text = capsys.readouterr().out
    for f in cli_fields(ServeOptions):
        assert "--" + f.name.replace("_", "-") in help_text
    for bad, flag in [(dict(port=70000), "--port"), (dict(max_header_bytes=10), "--max-header-bytes"),
                      (dict(core_timeout=float("nan")), "--core-timeout"), (dict(max_n=0), "--max-n"),
                      (dict(uvicorn_log_level="loud"), "--uvicorn-log-level"), (dict(port="80"), "port")]:
        with pytest.raises(ValueError, match=flag):
            ServeOptions(**bad)
    assert main(["serve", "random:tiny", "--request-read-timeout", "0"]) == 2
    assert "--request-read-timeout must be > 0" in capsys.readouterr().err


def test_request_logs_and_uvicorns_level():
    from tandem.server.launch import uvicorn_logging

    assert uvicorn_logging(ServeOptions()) == {"log_level": "warning", "access_log": False}
    assert uvicorn_logging(ServeOptions(log_level=logging.INFO)) == {"log_level": "info", "access_log": True}
    assert uvicorn_logging(ServeOptions(log_level=logging.INFO, disable_log_requests=True))["access_log"] is False
    assert uvicorn_logging(ServeOptions(uvicorn_log_level="debug"))["log_level"] == "debug"


def test_stats_cross_the_wire_as_the_cores_own_type():
    stats = CoreStats(3, 1, 0.25, 2, 0.5, 100, 40, 1.5, 0.25)
    assert Stats is CoreStats
    frame = output_encoder().encode(StepUpdate(StepDeltas(), stats))
    assert output_decoder().decode(frame).stats == stats


# --- a vLLM command line, unchanged -------------------------------------------------------------------
def test_a_vllm_command_line_serves(hub, tmp_path, monkeypatch):
    """vLLM's docs' form: positional hub id, --dtype auto, --max-model-len, --generation-config auto,
    several served names, a chat template file, vLLM's logging flags, -v after the subcommand."""
    from checkpoints import make_tokenizer
    from server_utils import ServerProcess

    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    template = tmp_path / "template.jinja"
    template.write_text(TEMPLATE)
    server = ServerProcess("org/tiny", "--dtype", "auto", "--max-model-len", "256", "--generation-config", "auto",
                           "--served-model-name", "tiny", "tiny-alias", "--chat-template", str(template),
                           "--max-logprobs", "5", "--disable-log-requests", "--uvicorn-log-level", "warning",
                           "--trust-remote-code", "--max-num-seqs", "4", "--enforce-eager", "-v")
    try:
        models = httpx.get(server.url + "/v1/models").json()["data"]
        assert [m["id"] for m in models] == ["tiny", "tiny-alias"]
        chat = {"model": "tiny-alias", "messages": [{"role": "user", "content": "hello"}], "ignore_eos": True}
        first, second = (httpx.post(server.url + "/v1/chat/completions", json=chat, timeout=60).json()
                         for _ in range(2))
        # generation_config.json: max_new_tokens 7 caps a request that gives none; top_k 1: the same text
        assert first["usage"]["completion_tokens"] == 7 and second["usage"]["completion_tokens"] == 7
        assert first["choices"][0]["message"]["content"] == second["choices"][0]["message"]["content"]
        rendered = httpx.post(server.url + "/tokenize", json={"messages": chat["messages"]}).json()
        assert rendered["tokens"] == make_tokenizer().encode("[user] hello\n>>", add_special_tokens=False)
        over = httpx.post(server.url + "/v1/completions", json={"prompt": "hi", "logprobs": 6, "max_tokens": 2})
        assert over.status_code == 400 and "max_logprobs" in over.text
    finally:
        server.stop()
    log = server.log()
    assert "engine ready in" in log and "max_model_len 256" in log and "KV cache" in log
