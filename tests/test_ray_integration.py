"""Ray Serve (tandem.integrations.ray): on a local Ray instance (2 CPUs, no dashboard) the deployment
built from ``serve run``-style string arguments starts a replica with a tiny model on the CPU and
answers OpenAI chat and completion requests (plain and streamed) through Ray Serve's HTTP proxy,
token-identical to the same engine in-process. Skipped only where Ray cannot be imported."""
import json
import socket
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'tandem-llm[ray]')")
serve = pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install 'ray[serve]')")

import httpx  # noqa: E402
import yaml  # noqa: E402

from tandem import LLM, SamplingParams  # noqa: E402
from tandem.integrations.ray import build_app, parse_serve_args  # noqa: E402

ARGS = {"model": "random:tiny", "device": "cpu", "dtype": "float32", "kv-cache-tokens": "1024",
        "max-num-seqs": "4", "served-model-name": "tiny", "num-cpus": "0.5"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_serve_url():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        port = _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(dict(ARGS)), name="tandem", route_prefix="/", blocking=False)
        url = f"http://127.0.0.1:{port}"
        with httpx.Client(timeout=60) as client:  # serve.run returns once the replica is up
            assert client.get(f"{url}/health").status_code == 200
        yield url
    finally:
        serve.shutdown()
        ray.shutdown()


def test_the_deployment_serves_completions_and_chat(ray_serve_url):
    expected = LLM("random:tiny", device="cpu", dtype="float32", kv_cache_tokens=1024).generate(
        ["Once upon a time"], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True), use_tqdm=False)
    with httpx.Client(base_url=ray_serve_url, timeout=60) as client:
        models = client.get("/v1/models").json()
        assert [m["id"] for m in models["data"]] == ["tiny"]
        done = client.post("/v1/completions", json={"model": "tiny", "prompt": "Once upon a time", "max_tokens": 8,
                                                    "temperature": 0, "ignore_eos": True}).json()
        assert done["choices"][0]["text"] == expected[0].outputs[0].text
        assert done["usage"]["completion_tokens"] == 8
        chat = client.post("/v1/chat/completions", json={
            "model": "tiny", "messages": [{"role": "user", "content": "Hi!"}], "max_tokens": 4, "temperature": 0,
            "ignore_eos": True}).json()
        assert chat["choices"][0]["message"]["role"] == "assistant"
        assert chat["usage"]["completion_tokens"] == 4
        assert "num_requests_running" in client.get("/metrics").text  # the replica's own /metrics
        streamed = []
        with client.stream("POST", "/v1/completions", json={"model": "tiny", "prompt": "Once upon a time",
                                                            "max_tokens": 8, "temperature": 0, "ignore_eos": True,
                                                            "stream": True}) as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            for line in response.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    streamed.append(json.loads(line[6:])["choices"][0]["text"])
        assert "".join(streamed) == expected[0].outputs[0].text


def test_flags_reach_the_engine_and_bad_ones_are_refused():
    config, options = parse_serve_args({"model": "random:tiny", "max-num-seqs": "8", "enforce-eager": "true",
                                        "served-model-name": "a,b", "max_n": 4})
    assert (config.max_num_seqs, config.enforce_eager, options.served_model_name, options.max_n) == \
        (8, True, ["a", "b"], 4)
    with pytest.raises(ValueError, match="invalid int value"):
        parse_serve_args({"model": "random:tiny", "max_num_seqs": "many"})
    with pytest.raises(ValueError, match="unknown option 'max_num_seq'"):
        build_app({"model": "random:tiny", "max_num_seq": "8"})
    with pytest.raises(ValueError, match=r"\['port'\].*http_options"):
        build_app({"model": "random:tiny", "port": "9000"})


def test_the_example_config_deploys_tandem():
    config = yaml.safe_load((Path(__file__).parents[1] / "examples/ray/serve_config.yaml").read_text())
    app = config["applications"][0]
    assert app["import_path"] == "tandem.integrations.ray:build_app"
    args = {k: v for k, v in app["args"].items() if k.replace("-", "_") not in
            ("num_replicas", "num_gpus", "num_cpus", "max_ongoing_requests", "name")}
    args["model"] = "random:tiny"  # the example names a checkpoint folder that is not here
    parse_serve_args(args)  # every flag it uses exists and its value parses


def test_a_replica_whose_engine_core_died_fails_its_health_check():
    from types import SimpleNamespace

    from tandem.integrations.ray import TandemReplica

    replica = TandemReplica()
    problem = {"now": None}
    client = SimpleNamespace(health_problem=lambda: problem["now"])
    replica.app = SimpleNamespace(state=SimpleNamespace(tandem_client=client))  # what Ray's wrapper holds
    replica.check_health()
    problem["now"] = "the engine core died"
    with pytest.raises(RuntimeError, match="the engine core died"):
        replica.check_health()  # Ray then replaces the replica
