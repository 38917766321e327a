"""Secrets: files written by ``parking secrets``, read by the settings, never shown.

The command line runs as a real process; the summary API runs on a real
uvicorn server.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from pydantic import SecretStr, ValidationError

from parking.secrets import SECRET_FILES, new_secret
from parking.settings import Settings
from tests.services import ApiServer

REPO = Path(__file__).resolve().parents[2]


def _parking(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "parking", *args],
        cwd=REPO,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _write(directory: Path, name: str, value: str) -> None:
    directory.mkdir(mode=0o700, exist_ok=True)
    (directory / name).write_text(value, encoding="utf-8")


# -- parking secrets init ----------------------------------------------------


def test_init_writes_private_random_files_and_prints_no_value(tmp_path: Path) -> None:
    target = tmp_path / "secrets"
    done = _parking("secrets", "init", "--dir", str(target))
    assert done.returncode == 0, done.stderr

    values = {name: (target / name).read_text() for name in SECRET_FILES}
    assert _mode(target) == 0o700
    assert {_mode(target / name) for name in SECRET_FILES} == {0o600}
    assert len(set(values.values())) == len(SECRET_FILES)
    assert all(len(value) >= 40 for value in values.values())
    for name, value in values.items():
        assert name in done.stdout
        assert value not in done.stdout + done.stderr


def test_init_keeps_existing_secrets_unless_forced(tmp_path: Path) -> None:
    target = tmp_path / "secrets"
    _write(target, "parking_broker_password", "chosen-by-the-operator-7f3a")

    kept = _parking("secrets", "init", "--dir", str(target))
    assert kept.returncode == 0, kept.stderr
    assert (target / "parking_broker_password").read_text() == (
        "chosen-by-the-operator-7f3a"
    )
    assert "kept" in kept.stdout
    first_token = (target / "parking_summary_api_token").read_text()

    forced = _parking("secrets", "init", "--dir", str(target), "--force")
    assert forced.returncode == 0, forced.stderr
    assert (target / "parking_broker_password").read_text() != (
        "chosen-by-the-operator-7f3a"
    )
    assert (target / "parking_summary_api_token").read_text() != first_token


def test_init_for_compose_lets_container_users_read_inside_a_private_dir(
    tmp_path: Path,
) -> None:
    target = tmp_path / "secrets"
    done = _parking("secrets", "init", "--dir", str(target), "--compose")
    assert done.returncode == 0, done.stderr
    assert _mode(target) == 0o700
    assert {_mode(target / name) for name in SECRET_FILES} == {0o644}


def test_init_gives_kept_secrets_the_mode_asked_for(tmp_path: Path) -> None:
    target = tmp_path / "secrets"
    assert _parking("secrets", "init", "--dir", str(target)).returncode == 0
    values = {name: (target / name).read_text() for name in SECRET_FILES}

    # Made for a local run first, then asked for compose, then local again.
    for flags, mode in [(["--compose"], 0o644), ([], 0o600)]:
        again = _parking("secrets", "init", "--dir", str(target), *flags)
        assert again.returncode == 0, again.stderr
        assert {_mode(target / name) for name in SECRET_FILES} == {mode}
        assert f"now mode {mode:04o}" in again.stdout
        assert {name: (target / name).read_text() for name in SECRET_FILES} == values


def test_run_refused_by_the_broker_names_the_secret_file_and_starts_nothing(
    tmp_path: Path,
) -> None:
    # What a local run meets after `parking secrets init` for compose.
    directory = tmp_path / "secrets"
    password = new_secret()
    _write(directory, "parking_broker_password", password)

    done = _parking("run", env={"PARKING_SECRETS_DIR": str(directory)})

    assert done.returncode == 1
    assert "RabbitMQ refused the login of amqp://" in done.stderr
    assert f"came from {directory / 'parking_broker_password'}" in done.stderr
    assert "Traceback" not in done.stderr
    assert "worker" not in done.stdout
    assert password not in done.stdout + done.stderr


def test_a_command_refused_by_the_broker_says_so_in_one_line(tmp_path: Path) -> None:
    directory = tmp_path / "secrets"
    password = new_secret()
    _write(directory, "parking_broker_password", password)
    events = tmp_path / "events.jsonl"
    event = {
        "id": "e1",
        "vehicle_plate": "AB123",
        "entry_date_time": "2024-09-11T21:24:56Z",
    }
    events.write_text(json.dumps(event) + "\n", encoding="utf-8")

    done = _parking("replay", str(events), env={"PARKING_SECRETS_DIR": str(directory)})

    assert done.returncode == 1
    assert "RabbitMQ refused the login of amqp://" in done.stderr
    assert f"came from {directory / 'parking_broker_password'}" in done.stderr
    assert "Traceback" not in done.stderr
    assert password not in done.stdout + done.stderr


# -- settings from files -------------------------------------------------------


def test_settings_read_each_secret_from_the_file_named_after_it(
    tmp_path: Path,
) -> None:
    broker, redis_password, token, flower = (new_secret() for _ in range(4))
    _write(tmp_path, "parking_broker_password", broker + "\n")
    _write(tmp_path, "parking_redis_password", redis_password)
    _write(tmp_path, "parking_summary_api_token", token)
    _write(tmp_path, "parking_flower_password", flower)

    settings = Settings(
        _secrets_dir=tmp_path,
        environment="production",
        broker_url="amqp://parking@rabbitmq:5672/parking",
        redis_url="redis://redis:6379",
    )

    assert settings.broker_connection_url == (
        f"amqp://parking:{broker}@rabbitmq:5672/parking"
    )
    assert settings.redis_connection_url(3) == f"redis://:{redis_password}@redis:6379/3"
    assert settings.summary_api_token == SecretStr(token)
    assert settings.flower_password == SecretStr(flower)
    assert broker not in repr(settings)


@pytest.mark.parametrize("default", ["guest", "Admin", "changeme"])
def test_default_password_refused_outside_development(
    tmp_path: Path, default: str
) -> None:
    other = new_secret()
    _write(tmp_path, "parking_broker_password", default)
    _write(tmp_path, "parking_redis_password", other)

    with pytest.raises(ValidationError) as refused:
        Settings(_secrets_dir=tmp_path, environment="production")

    message = str(refused.value)
    assert "known default password for broker refused" in message
    assert other not in message
    assert Settings(_secrets_dir=tmp_path, environment="development")


def test_service_refuses_to_start_with_a_default_password(tmp_path: Path) -> None:
    other = new_secret()
    _write(tmp_path, "parking_broker_password", "guest")
    _write(tmp_path, "parking_summary_api_token", other)

    done = _parking(
        "api",
        env={"PARKING_SECRETS_DIR": str(tmp_path), "PARKING_ENVIRONMENT": "staging"},
    )

    assert done.returncode != 0
    assert "known default password for broker refused" in done.stderr
    assert "'staging'" in done.stderr
    assert other not in done.stdout + done.stderr


def test_api_refuses_to_start_without_a_token_outside_development(
    tmp_path: Path,
) -> None:
    _write(tmp_path, "parking_broker_password", new_secret())

    done = _parking(
        "api",
        env={"PARKING_SECRETS_DIR": str(tmp_path), "PARKING_ENVIRONMENT": "production"},
    )

    assert done.returncode != 0
    assert "the summary API needs PARKING_SUMMARY_API_TOKEN" in done.stderr
    assert "Traceback" not in done.stderr


# -- RabbitMQ definitions ----------------------------------------------------


def test_rabbitmq_definitions_get_a_salted_hash_of_the_broker_secret(
    tmp_path: Path,
) -> None:
    password = new_secret()
    _write(tmp_path / "secrets", "parking_broker_password", password)
    out = tmp_path / "out" / "definitions.json"

    done = _parking(
        "secrets",
        "rabbitmq-definitions",
        "--template",
        "deploy/rabbitmq/definitions.json",
        "--out",
        str(out),
        env={
            "PARKING_SECRETS_DIR": str(tmp_path / "secrets"),
            "PARKING_ENVIRONMENT": "production",
            "PARKING_BROKER_URL": "amqp://parking@rabbitmq:5672/parking",
        },
    )
    assert done.returncode == 0, done.stderr

    text = out.read_text()
    assert password not in text + done.stdout + done.stderr
    (user,) = json.loads(text)["users"]
    assert user["hashing_algorithm"] == "rabbit_password_hashing_sha256"
    stored = base64.b64decode(user["password_hash"])
    salt, digest = stored[:4], stored[4:]
    assert digest == hashlib.sha256(salt + password.encode()).digest()


def test_rabbitmq_definitions_need_a_broker_password(tmp_path: Path) -> None:
    done = _parking(
        "secrets",
        "rabbitmq-definitions",
        "--template",
        "deploy/rabbitmq/definitions.json",
        "--out",
        str(tmp_path / "definitions.json"),
        env={
            "PARKING_SECRETS_DIR": str(tmp_path),
            "PARKING_BROKER_URL": "amqp://parking@rabbitmq:5672/parking",
        },
    )
    assert done.returncode != 0
    assert "parking_broker_password" in done.stderr
    assert not (tmp_path / "definitions.json").exists()


# -- summary API auth --------------------------------------------------------


@pytest.fixture
def guarded_api(tmp_path: Path) -> Iterator[ApiServer]:
    settings = Settings(
        summary_csv=tmp_path / "stays.csv",
        summary_api_token=SecretStr(new_secret()),
        api_require_token_for_reads=True,
    )
    server = ApiServer(settings)
    server.start()
    yield server
    server.stop()


def _stay() -> dict[str, str]:
    return {
        "stay_id": "stay-auth-1",
        "vehicle_plate": "AB123",
        "entry_date_time": "2024-09-11T21:00:00Z",
        "exit_date_time": "2024-09-11T22:00:00Z",
        "duration_seconds": "3600",
        "lot_id": "main",
        "fee": "3.00",
        "currency": "AUD",
    }


def _unauthorised_count(server: ApiServer) -> float:
    text = requests.get(f"{server.url}/metrics", timeout=5).text
    for line in text.splitlines():
        if line.startswith("parking_api_unauthorized_total "):
            return float(line.split()[1])
    raise AssertionError("parking_api_unauthorized_total not exported")


def test_post_without_the_token_gets_401_and_is_counted(guarded_api: ApiServer) -> None:
    token = guarded_api.settings.summary_api_token
    assert token is not None
    secret = token.get_secret_value()
    url = f"{guarded_api.url}/summaries"

    missing = requests.post(url, json=_stay(), timeout=5)
    wrong = requests.post(
        url, json=_stay(), headers={"Authorization": "Bearer nope"}, timeout=5
    )
    read = requests.get(url, timeout=5)

    assert [missing.status_code, wrong.status_code, read.status_code] == [401] * 3
    assert missing.headers["WWW-Authenticate"] == "Bearer"
    assert _unauthorised_count(guarded_api) == 3
    for response in (missing, wrong, read):
        assert secret not in response.text

    bearer = {"Authorization": f"Bearer {secret}"}
    assert (
        requests.post(url, json=_stay(), headers=bearer, timeout=5).status_code == 201
    )
    listed = requests.get(url, headers=bearer, timeout=5)
    assert listed.status_code == 200
    assert listed.json()["total"] == 1
    assert _unauthorised_count(guarded_api) == 3
