"""The compose file, the image and the secrets, checked without a Docker engine.

``docker-compose config`` (Debian's docker-compose) validates and resolves
``docker-compose.yml``; the tests read the resolved file. The system itself
then runs locally as real processes (``parking run``) with the same setting
names and secret files as in compose, on a RabbitMQ user and a Redis server of
its own with fresh random passwords, and none of them may show up anywhere.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis
import requests
import yaml
from kombu.connection import Connection

from parking.events import EventKind
from parking.ports import free_port
from parking.secrets import SECRET_FILES
from parking.settings import Settings
from tests.services import wait_until
from workers.topology import (
    dead_letter_queue,
    raw_queue,
    task_exchange,
    task_queues,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(400)]

REPO = Path(__file__).resolve().parents[2]
DEFINITIONS = REPO / "deploy" / "rabbitmq" / "definitions.json"
SECRET_WORDS = {"PASSWORD", "PASS", "PASSWD", "TOKEN", "SECRET", "CREDENTIALS"}
RESTART_POLICIES = {"always", "unless-stopped", "on-failure"}


# -- the compose file --------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    if shutil.which("docker-compose") is None:
        pytest.fail("docker-compose missing: apt-get install docker-compose (.ci/run)")
    # Host-port variables of the developer's shell must not change the result.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PARKING_")}
    done = subprocess.run(
        ["docker-compose", "--file", "docker-compose.yml", "config"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    parsed: dict[str, Any] = yaml.safe_load(done.stdout)
    return parsed


def _strings(node: Any) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for key, value in node.items():
            yield str(key)
            yield from _strings(value)
    elif isinstance(node, list):
        for item in node:
            yield from _strings(item)


def _command(service: dict[str, Any]) -> str:
    command = service.get("command") or []
    return command if isinstance(command, str) else " ".join(command)


def _mounts(service: dict[str, Any]) -> dict[str, str]:
    """Target path -> source (a named volume or an absolute host path)."""
    found = {}
    for volume in service.get("volumes") or []:
        if isinstance(volume, dict):
            found[volume["target"]] = str(volume.get("source", ""))
        else:
            source, target, *_ = volume.split(":")
            found[target] = source
    return found


def _secret_like(key: str) -> bool:
    upper = key.upper()
    return bool(set(upper.split("_")) & SECRET_WORDS) or "BASIC_AUTH" in upper


def test_no_plain_password_anywhere_in_the_resolved_file(
    compose: dict[str, Any],
) -> None:
    for name, service in compose["services"].items():
        for key, value in (service.get("environment") or {}).items():
            if _secret_like(key):
                # Only pointers to secret files, never a value.
                assert key.endswith("_FILE"), (name, key)
                assert str(value).startswith("/run/secrets/"), (name, key)
    for text in _strings(compose):
        for word in text.split():
            if "://" in word:
                assert urlsplit(word.strip("'\"")).password is None, word
    words = set(re.findall(r"[A-Za-z0-9]+", " ".join(_strings(compose))))
    assert not words & {"guest", "changeme"}


def test_every_secret_is_a_file_named_after_the_setting_it_fills(
    compose: dict[str, Any],
) -> None:
    declared = compose["secrets"]
    assert set(declared) == set(SECRET_FILES)
    for name, spec in declared.items():
        assert Path(spec["file"]) == REPO / "secrets" / name
        if name.startswith("parking_"):
            assert name.removeprefix("parking_") in Settings.model_fields

    def used_by(service: str) -> set[str]:
        entries = compose["services"][service].get("secrets") or []
        return {e["source"] if isinstance(e, dict) else e for e in entries}

    broker, redis_pw, token = (
        "parking_broker_password",
        "parking_redis_password",
        "parking_summary_api_token",
    )
    assert {broker, redis_pw, token} <= used_by("worker")
    assert {broker, redis_pw, token} <= used_by("ingest")
    assert broker in used_by("beat")
    assert broker in used_by("rabbitmq-definitions")
    assert {broker, "parking_flower_password"} <= used_by("flower")
    assert token in used_by("api")
    assert redis_pw in used_by("redis")
    assert "grafana_admin_password" in used_by("grafana")
    assert "parking_flower_password" in _command(compose["services"]["flower"])
    grafana_env = compose["services"]["grafana"]["environment"]
    assert grafana_env["GF_SECURITY_ADMIN_PASSWORD__FILE"] == (
        "/run/secrets/grafana_admin_password"
    )


def test_worker_scales_and_exactly_one_beat_runs(compose: dict[str, Any]) -> None:
    services = compose["services"]
    worker = services["worker"]
    for fixed in ("container_name", "ports", "hostname"):
        assert fixed not in worker, fixed
    assert worker.get("deploy", {}).get("replicas", 1) == 1

    beats = [n for n, s in services.items() if re.search(r"\bbeat\b", _command(s))]
    assert beats == ["beat"]
    assert services["beat"]["deploy"]["replicas"] == 1
    assert "-B" not in _command(worker).split()


def test_services_have_health_checks_conditions_restarts_and_one_network(
    compose: dict[str, Any],
) -> None:
    services = compose["services"]
    (network,) = compose["networks"]
    one_shots = set()
    for name, service in services.items():
        assert set(service["networks"]) == {network}, name
        if service.get("restart") == "no":
            one_shots.add(name)
            continue
        assert service.get("restart") in RESTART_POLICIES, name
        check = service.get("healthcheck", {})
        assert check.get("test"), name
        assert not check.get("disable"), name

    for name, service in services.items():
        for dependency, spec in (service.get("depends_on") or {}).items():
            expected = (
                "service_completed_successfully"
                if dependency in one_shots
                else "service_healthy"
            )
            assert spec["condition"] == expected, (name, dependency)
    assert one_shots == {"rabbitmq-definitions"}
    assert set(services["worker"]["depends_on"]) >= {"rabbitmq", "redis", "api"}
    assert "rabbitmq-definitions" in services["rabbitmq"]["depends_on"]


def test_state_lives_on_volumes_and_configuration_comes_from_deploy(
    compose: dict[str, Any],
) -> None:
    services = compose["services"]
    deploy = REPO / "deploy"

    redis_mounts = _mounts(services["redis"])
    assert redis_mounts["/data"] in compose["volumes"]
    redis_conf = (deploy / "redis" / "redis.conf").read_text()
    assert re.search(r"^appendonly yes$", redis_conf, re.MULTILINE)
    # The store's time slices expire whole, off the main thread.
    assert re.search(r"^lazyfree-lazy-expire yes$", redis_conf, re.MULTILINE)

    csv = services["api"]["environment"]["PARKING_SUMMARY_CSV"]
    api_mounts = _mounts(services["api"])
    assert any(
        csv.startswith(t + "/") and s in compose["volumes"]
        for t, s in api_mounts.items()
    )

    assert set(_mounts(services["prometheus"]).values()) >= {
        str(deploy / "prometheus" / "prometheus.yml"),
        str(deploy / "prometheus" / "alerts.yml"),
    }
    assert set(_mounts(services["grafana"]).values()) >= {
        str(deploy / "grafana" / "provisioning"),
        str(deploy / "grafana" / "dashboards"),
    }

    rabbit = _mounts(services["rabbitmq"])
    plugins = Path(rabbit["/etc/rabbitmq/enabled_plugins"]).read_text()
    assert "rabbitmq_management" in plugins
    assert "rabbitmq_prometheus" in plugins
    conf = Path(rabbit["/etc/rabbitmq/conf.d/20-parking.conf"]).read_text()
    loaded = re.search(r"^definitions\.local\.path = (\S+)$", conf, re.MULTILINE)
    assert loaded is not None
    assert rabbit[str(Path(loaded.group(1)).parent)] == "rabbitmq-definitions"
    assert _mounts(services["rabbitmq-definitions"])["/app/var"] == (
        "rabbitmq-definitions"
    )


def test_image_is_multi_stage_non_root_and_without_test_dependencies(
    compose: dict[str, Any],
) -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    stages = re.findall(r"^FROM (\S+)", dockerfile, re.MULTILINE)
    assert len(stages) >= 2
    runtime = dockerfile.rsplit("\nFROM ", 1)[1]
    users = re.findall(r"^USER (\S+)", runtime, re.MULTILINE)
    assert users
    assert users[-1] not in {"root", "0"}
    assert re.search(r"^HEALTHCHECK ", runtime, re.MULTILINE)
    installs = " ".join(re.findall(r"pip install[^\n]*", dockerfile))
    assert "[" not in installs
    assert "-e " not in installs
    assert "pytest" not in installs

    images = stages + [s["image"] for s in compose["services"].values()]
    for image in images:
        first = image.split("/")[0]
        assert "/" not in image or not {".", ":"} & set(first), image

    ignored = (REPO / ".dockerignore").read_text().split()
    assert ignored[ignored.index("*") :][0] == "*"
    assert not [line for line in ignored if line.startswith("!") and "secret" in line]


def test_rabbitmq_definitions_declare_what_the_workers_declare(
    compose: dict[str, Any],
) -> None:
    definitions = json.loads(DEFINITIONS.read_text())
    defaults = {
        name: Settings.model_fields[name].default
        for name in ("delivery_limit", "raw_entry_queue", "raw_exit_queue")
    }
    settings = Settings(queue_prefix="parking", **defaults)
    broker = urlsplit(
        compose["services"]["worker"]["environment"]["PARKING_BROKER_URL"]
    )
    vhost = broker.path.lstrip("/")

    queues = [
        *task_queues(settings),
        dead_letter_queue(settings),
        *(raw_queue(settings, kind) for kind in EventKind),
    ]
    assert {q["name"]: q["arguments"] for q in definitions["queues"]} == {
        q.name: q.as_dict()["queue_arguments"] for q in queues
    }
    assert all(q["durable"] and q["vhost"] == vhost for q in definitions["queues"])
    exchanges = {e["name"]: e["type"] for e in definitions["exchanges"]}
    dead = dead_letter_queue(settings)
    assert exchanges == {
        task_exchange(settings).name: "topic",
        dead.exchange.name: "fanout",
    }
    bindings = {
        (b["source"], b["destination"], b["routing_key"])
        for b in definitions["bindings"]
    }
    assert bindings == {
        (q.exchange.name, q.name, q.routing_key) for q in [*task_queues(settings), dead]
    }

    (user,) = definitions["users"]
    assert user["name"] == broker.username
    assert "password" not in user
    assert "password_hash" not in user
    assert definitions["vhosts"] == [{"name": vhost}]
    (grant,) = definitions["permissions"]
    assert (grant["user"], grant["vhost"]) == (broker.username, vhost)


# -- the system, run locally on secret files -----------------------------------

ROUTED_PREFIX = re.compile(r"^parking(?=$|\.)")


def _definitions_for(vhost: str, user: str, prefix: str) -> dict[str, Any]:
    """The committed definitions, moved to a test vhost, user and queue prefix."""

    def rename(name: str) -> str:
        return ROUTED_PREFIX.sub(prefix, name)

    definitions: dict[str, Any] = json.loads(DEFINITIONS.read_text())
    definitions["vhosts"] = [{"name": vhost}]
    definitions["users"][0]["name"] = user
    definitions["permissions"][0].update(user=user, vhost=vhost)
    for policy in definitions.get("policies", []):
        policy["vhost"] = vhost
        policy["pattern"] = policy["pattern"].replace("parking", prefix)
    for section in ("exchanges", "queues", "bindings"):
        for item in definitions[section]:
            item["vhost"] = vhost
            for key in ("name", "source", "destination", "routing_key"):
                if key in item:
                    item[key] = rename(item[key])
            arguments = item.get("arguments", {})
            if "x-dead-letter-exchange" in arguments:
                arguments["x-dead-letter-exchange"] = rename(
                    arguments["x-dead-letter-exchange"]
                )
    return definitions


def _parking(env: dict[str, str], *args: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "parking", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr


def _descendants(root: int) -> dict[int, bytes]:
    """Command lines of every process below ``root``."""
    parents: dict[int, int] = {}
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat_file.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat_file.parent.name)] = int(fields[1])
    found: dict[int, bytes] = {}
    frontier = [root]
    while frontier:
        parent = frontier.pop()
        for pid, ppid in parents.items():
            if ppid == parent and pid not in found:
                try:
                    found[pid] = Path(f"/proc/{pid}/cmdline").read_bytes()
                except OSError:
                    continue
                frontier.append(pid)
    return found


def _stop(process: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


class LocalSystem:
    """Everything the run needs, created fresh and removed again."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.secrets = root / "secrets"
        self.var = root / "var"
        token = secrets.token_hex(4)
        self.vhost = f"{os.environ.get('PARKING_TEST_VHOST', 'parking-test')}-secrets"
        self.user = f"ptest-secrets-{token}"
        self.prefix = Settings().queue_prefix
        self.redis_port = free_port()
        self.api_port = free_port()
        self.flower_port = free_port()
        self.processes: list[subprocess.Popen[bytes]] = []

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PROMETHEUS")}
        env.update(
            PARKING_ENVIRONMENT="production",
            PARKING_SECRETS_DIR=str(self.secrets),
            PARKING_BROKER_URL=f"amqp://{self.user}@127.0.0.1:5672/{self.vhost}",
            PARKING_REDIS_URL=f"redis://127.0.0.1:{self.redis_port}",
            PARKING_VAR_DIR=str(self.var),
            PARKING_SUMMARY_CSV=str(self.var / "stays.csv"),
            PARKING_API_PORT=str(self.api_port),
            PARKING_SUMMARY_API_URL=f"http://127.0.0.1:{self.api_port}",
            PARKING_API_REQUIRE_TOKEN_FOR_READS="true",
            PARKING_FLOWER_PORT=str(self.flower_port),
            PARKING_WORKER_METRICS_PORT=str(free_port()),
            PARKING_BEAT_METRICS_PORT=str(free_port()),
            PARKING_INGEST_METRICS_PORT=str(free_port()),
            PARKING_WORKER_CONCURRENCY="1",
            PARKING_ENTRY_INTERVAL_SECONDS="0.3",
            PARKING_EXIT_INTERVAL_SECONDS="0.3",
            PARKING_GRACE_SECONDS="5",
        )
        return env

    def secret(self, name: str) -> str:
        return (self.secrets / name).read_text().strip()

    def values(self) -> dict[str, str]:
        return {name: self.secret(name) for name in SECRET_FILES}

    def start_broker_user(self) -> None:
        """The committed definitions, hashed by ``parking secrets``, imported."""
        template = self.root / "definitions.template.json"
        template.write_text(
            json.dumps(_definitions_for(self.vhost, self.user, self.prefix))
        )
        rendered = self.root / "definitions.json"
        _parking(
            self.env(),
            "secrets",
            "rabbitmq-definitions",
            f"--template={template}",
            f"--out={rendered}",
        )
        # Through stdin: rabbitmqctl runs as the rabbitmq user, who cannot
        # read this test's private directory.
        subprocess.run(
            ["rabbitmqctl", "-q", "import_definitions", "--format", "json"],
            input=rendered.read_bytes(),
            capture_output=True,
            check=True,
            timeout=120,
        )
        password = self.secret("parking_broker_password")
        url = f"amqp://{self.user}:{password}@127.0.0.1:5672/{self.vhost}"

        def connects() -> bool:
            with Connection(url, connect_timeout=2) as conn:
                try:
                    conn.connect()
                    conn.default_channel.queue_declare(
                        f"{self.prefix}.entry", passive=True
                    )
                except (*conn.connection_errors, *conn.channel_errors):
                    return False
            return True

        # Definition import runs asynchronously in the broker.
        wait_until(connects, timeout=60, interval=0.5)

    def stop_broker_user(self) -> None:
        for args in (("delete_vhost", self.vhost), ("delete_user", self.user)):
            subprocess.run(["rabbitmqctl", "-q", *args], capture_output=True)

    def start_redis(self) -> redis.Redis:
        (self.root / "redis").mkdir()
        process = subprocess.Popen(
            [
                "sh", str(REPO / "deploy" / "redis" / "start.sh"),
                "redis-server", "--port", str(self.redis_port),
                "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--dir", str(self.root / "redis"),
                "--logfile", str(self.root / "redis" / "redis.log"),
            ],
            env={
                **os.environ,
                "REDIS_PASSWORD_FILE": str(self.secrets / "parking_redis_password"),
            },
            start_new_session=True,
        )  # fmt: skip
        self.processes.append(process)
        client = redis.Redis(
            port=self.redis_port, password=self.secret("parking_redis_password")
        )

        def answers() -> bool:
            try:
                return bool(client.ping())
            except redis.ConnectionError:
                return False

        wait_until(answers, timeout=30)
        return client

    def start_system(self, log: Path) -> subprocess.Popen[bytes]:
        with log.open("wb") as handle:
            process = subprocess.Popen(
                [sys.executable, "-m", "parking", "run"],
                cwd=REPO,
                env=self.env(),
                stdout=handle,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.processes.append(process)
        return process

    def stop_processes(self) -> None:
        for process in reversed(self.processes):
            _stop(process)


@pytest.fixture
def local_system(tmp_path: Path) -> Iterator[LocalSystem]:
    if shutil.which("rabbitmqctl") is None or shutil.which("redis-server") is None:
        pytest.fail("this test needs rabbitmqctl and redis-server on this machine")
    system = LocalSystem(tmp_path)
    _parking(system.env(), "secrets", "init", f"--dir={system.secrets}")
    try:
        yield system
    finally:
        system.stop_processes()
        system.stop_broker_user()


def _no_secret_in(values: dict[str, str], where: str, data: bytes) -> None:
    # Names only: a failing run must not print the value it found.
    shown = sorted(name for name, value in values.items() if value.encode() in data)
    assert not shown, f"secrets {shown} show in {where}"


def test_local_system_on_secret_files_never_shows_a_secret(
    local_system: LocalSystem,
) -> None:
    system = local_system
    values = system.values()
    store = system.start_redis()
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(port=system.redis_port).ping()
    system.start_broker_user()

    log = system.root / "run.log"
    run = system.start_system(log)
    token = system.secret("parking_summary_api_token")
    api = f"http://127.0.0.1:{system.api_port}"
    bearer = {"Authorization": f"Bearer {token}"}

    def stays() -> int:
        try:
            answer = requests.get(f"{api}/summaries", headers=bearer, timeout=5)
        except requests.ConnectionError:
            return 0
        return int(answer.json()["total"]) if answer.ok else 0

    wait_until(lambda: run.poll() is not None or stays() >= 1, timeout=180, interval=1)
    if run.poll() is not None:
        # The reason a service stopped is in its own lines, often far up.
        lines = log.read_text().splitlines()
        first = next((i for i, x in enumerate(lines) if "stopped (rc=" in x), 0)
        raise AssertionError("\n".join(lines[max(0, first - 40) : first + 5]))
    assert store.info("keyspace"), "nothing stored in the password-protected Redis"

    # Every process of the system: no secret on any command line.
    commands = _descendants(run.pid)
    assert len(commands) >= 5
    for pid, command in commands.items():
        _no_secret_in(values, f"the command line of pid {pid}", command)
    redis_pid = system.processes[0].pid
    _no_secret_in(
        values,
        "redis-server's command line",
        Path(f"/proc/{redis_pid}/cmdline").read_bytes(),
    )

    # Health, refusals and errors of the API.
    stay = {"stay_id": "probe", "vehicle_plate": "AB1"}
    answers = [
        requests.get(f"{api}/healthz", timeout=5),
        requests.post(f"{api}/summaries", json=stay, timeout=5),
        requests.post(
            f"{api}/summaries",
            json=stay,
            headers={"Authorization": "Bearer x"},
            timeout=5,
        ),
        requests.get(f"{api}/summaries", timeout=5),
        requests.post(f"{api}/summaries", json=stay, headers=bearer, timeout=5),
    ]
    assert [a.status_code for a in answers] == [200, 401, 401, 401, 422]
    for answer in answers:
        _no_secret_in(values, f"an API answer {answer.status_code}", answer.content)
    metrics = requests.get(f"{api}/metrics", timeout=5).text
    assert re.search(r"^parking_api_unauthorized_total 3\.0$", metrics, re.MULTILINE)

    # Flower behind its basic auth, the password taken from the secret file.
    flower = f"http://127.0.0.1:{system.flower_port}/"
    wait_until(lambda: _answers(flower), timeout=60, interval=0.5)
    refused = requests.get(flower, timeout=5)
    assert refused.status_code == 401
    _no_secret_in(values, "Flower's 401", refused.content)
    auth = ("admin", system.secret("parking_flower_password"))
    assert requests.get(flower, auth=auth, timeout=10).status_code == 200

    _stop(run, signal.SIGINT)
    output = log.read_bytes()
    # The URLs in the logs are there, masked.
    assert f"amqp://{system.user}:**@127.0.0.1:5672/{system.vhost}".encode() in output
    files = [p for p in system.root.rglob("*") if p.is_file()]
    assert log in files
    assert system.root / "redis" / "redis.log" in files
    for path in files:
        if system.secrets not in path.parents:
            _no_secret_in(values, str(path.relative_to(system.root)), path.read_bytes())


def _answers(url: str) -> bool:
    try:
        requests.get(url, timeout=2)
    except requests.ConnectionError:
        return False
    return True
