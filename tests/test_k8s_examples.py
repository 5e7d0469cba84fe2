"""The Kubernetes examples (examples/k8s, docs/scale_out.md) parse, and every `tandem serve` command
in them uses flags `tandem serve` has, with values its parser and option checks accept; probes hit
/health on the port the server listens on; the LeaderWorkerSet's torchrun world is the tensor-parallel
size."""
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from tandem.cli import parse
from tandem.cli.serve import configure
from tandem.engine.kv_events import parse_kv_events_config

EXAMPLES = Path(__file__).parents[1] / "examples" / "k8s"
FILES = sorted(EXAMPLES.glob("*.yaml"))


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _containers(doc: dict) -> list[dict]:
    """Every container of a Deployment's pod template or a LeaderWorkerSet's leader and worker templates."""
    spec = doc.get("spec", {})
    templates = [spec.get("template")]
    lws = spec.get("leaderWorkerTemplate", {})
    templates += [lws.get("leaderTemplate"), lws.get("workerTemplate")]
    return [c for t in templates if t for c in t["spec"]["containers"]]


def _command(container: dict) -> list[str]:
    """The container's command line as words; a `sh -c` script is split as the shell would (with the
    pod's $(VAR) references replaced by sample values)."""
    words = container.get("command", []) + container.get("args", [])
    if words[:2] == ["sh", "-c"]:
        script = re.sub(r"\$\((LWS_GROUP_SIZE)\)", "2", words[2])
        script = re.sub(r"\$\((LWS_WORKER_INDEX)\)", "1", script)
        words = shlex.split(script.replace("$(LWS_LEADER_ADDRESS)", "10.0.0.1"))
    return words


def _serve_argv(words: list[str]) -> list[str]:
    """The arguments after `serve` (`tandem serve ...` or `... -m tandem.cli serve ...`)."""
    return words[words.index("serve") + 1:]


def test_there_are_the_three_examples():
    assert {p.name for p in FILES} == {"deployment.yaml", "leaderworkerset.yaml", "inferencepool.yaml"}


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_every_tandem_serve_command_parses_and_its_probes_hit_health(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    serving = 0
    for doc in _docs(path):
        for container in _containers(doc):
            words = _command(container)
            argv = _serve_argv(words)
            args = parse(["serve", *argv])  # an unknown flag or bad value exits with argparse's error
            config, options = configure(args)  # the engine's and the server's own checks
            serving += 1
            assert options.host == "0.0.0.0", "a pod must listen beyond loopback"
            ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
            if "http" in ports:
                assert ports["http"] == options.port
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                if probe in container:
                    assert container[probe]["httpGet"] == {"path": "/health", "port": "http"}
            if config.kv_events_config:
                events = parse_kv_events_config(config.kv_events_config)
                assert events.active and events.endpoint.endswith(f":{ports['kv-events']}")
            if words[0] == "torchrun":
                flags = dict(zip(words[1:words.index("-m")][::2], words[1:words.index("-m")][1::2]))
                world = int(flags["--nnodes"]) * int(flags["--nproc-per-node"])
                assert world == config.tensor_parallel_size
                assert int(container["resources"]["limits"]["nvidia.com/gpu"]) == int(flags["--nproc-per-node"])
    assert serving or path.name == "inferencepool.yaml"


def test_the_inference_pool_selects_the_deployments_pods_on_the_server_port():
    deployment = {d["kind"]: d for d in _docs(EXAMPLES / "deployment.yaml")}["Deployment"]
    pool, route = _docs(EXAMPLES / "inferencepool.yaml")
    assert pool["kind"] == "InferencePool" and route["kind"] == "HTTPRoute"
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert pool["spec"]["selector"]["matchLabels"].items() <= labels.items()
    port = configure(parse(["serve", *_serve_argv(_command(_containers(deployment)[0]))]))[1].port
    assert pool["spec"]["targetPorts"] == [{"number": port}]
    assert route["spec"]["rules"][0]["backendRefs"][0]["name"] == pool["metadata"]["name"]


def test_the_kv_events_config_of_the_deployment_is_json():
    deployment = _docs(EXAMPLES / "deployment.yaml")[0]
    args = _containers(deployment)[0]["args"]
    assert json.loads(args[args.index("--kv-events-config") + 1])["enable_kv_cache_events"] is True
