"""Secret files: ``parking secrets init`` and the RabbitMQ user definitions.

Each secret is one file named like the setting it fills (pydantic-settings
reads ``<env prefix><field>`` from the secrets directory), so the same file
works as ``./secrets/<name>`` for ``parking run`` and as
``/run/secrets/<name>`` under Docker Compose.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import logging
import os
import secrets
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import click

from parking.settings import get_settings

logger = logging.getLogger(__name__)

#: Every secret file the system reads, and what it protects.
SECRET_FILES: dict[str, str] = {
    "parking_broker_password": "RabbitMQ password of the application user",
    "parking_redis_password": "Redis password",
    "parking_summary_api_token": "bearer token of the summary API",
    "parking_flower_password": "Flower basic-auth password",
    "grafana_admin_password": "Grafana admin password",
}

PRIVATE_FILE_MODE = 0o600
#: Compose without Swarm bind-mounts a secret file with its host owner and
#: mode, and each container reads it as its own user; the 0700 directory
#: still keeps other host users out.
CONTAINER_FILE_MODE = 0o644
DIRECTORY_MODE = 0o700

RABBITMQ_HASHING = "rabbit_password_hashing_sha256"


@dataclass
class InitResult:
    written: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)


def new_secret() -> str:
    """A random value safe in URLs, config files and JSON (43 characters)."""
    return secrets.token_urlsafe(32)


def _write_private(path: Path, text: str, mode: int) -> None:
    # Written beside the target and renamed: a reader never sees half a file,
    # and the file has its final mode before it holds anything.
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def init_secrets(
    directory: Path, force: bool = False, mode: int = PRIVATE_FILE_MODE
) -> InitResult:
    """Write a fresh value for every missing secret file (all with ``force``);
    every file, kept or written, gets ``mode``."""
    directory.mkdir(mode=DIRECTORY_MODE, parents=True, exist_ok=True)
    directory.chmod(DIRECTORY_MODE)
    result = InitResult()
    for name in SECRET_FILES:
        path = directory / name
        if path.exists() and not force:
            # The value stays; the mode follows the run that asked for it,
            # or compose containers could not read secrets made for a local
            # run (and a local run would leave them readable to all).
            path.chmod(mode)
            result.kept.append(name)
            continue
        _write_private(path, new_secret(), mode)
        result.written.append(name)
    logger.info(
        "secrets initialised dir=%s written=%d kept=%d",
        directory, len(result.written), len(result.kept),
    )  # fmt: skip
    return result


def rabbitmq_password_hash(password: str, salt: bytes | None = None) -> str:
    """RabbitMQ's stored form: base64(salt + SHA-256(salt + password))."""
    salt = os.urandom(4) if salt is None else salt
    digest = hashlib.sha256(salt + password.encode("utf-8")).digest()
    return base64.b64encode(salt + digest).decode("ascii")


def with_user_password(
    definitions: dict[str, Any], user: str, password: str
) -> dict[str, Any]:
    """The definitions with ``user``'s password set as a salted hash."""
    rendered = copy.deepcopy(definitions)
    for entry in rendered.get("users", []):
        if entry.get("name") == user:
            entry["password_hash"] = rabbitmq_password_hash(password)
            entry["hashing_algorithm"] = RABBITMQ_HASHING
            return rendered
    raise click.ClickException(
        f"the RabbitMQ definitions declare no user {user!r} (the broker URL's user)"
    )


@click.group(name="secrets")
def secrets_cli() -> None:
    """Create secret files and what is derived from them."""


@secrets_cli.command()
@click.option(
    "--dir",
    "directory",
    envvar="PARKING_SECRETS_DIR",
    default="secrets",
    show_default=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Where to write them (env PARKING_SECRETS_DIR).",
)
@click.option("--force", is_flag=True, help="Replace existing secrets too.")
@click.option(
    "--compose",
    is_flag=True,
    help="Files readable by the containers' own users (0644 in a 0700 dir).",
)
def init(directory: Path, force: bool, compose: bool) -> None:
    """Write fresh random secrets; existing files are kept unless --force."""
    mode = CONTAINER_FILE_MODE if compose else PRIVATE_FILE_MODE
    result = init_secrets(directory, force=force, mode=mode)
    for name in result.written:
        click.echo(f"wrote {directory / name} ({SECRET_FILES[name]})")
    for name in result.kept:
        click.echo(
            f"kept  {directory / name} (exists, now mode {mode:04o};"
            " --force replaces it)"
        )


@secrets_cli.command("rabbitmq-definitions")
@click.option(
    "--template",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Definitions whose application user has no password yet.",
)
@click.option(
    "--out",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Where RabbitMQ loads them from at boot.",
)
def rabbitmq_definitions(template: Path, out: Path) -> None:
    """Fill in the application user's password hash from the broker secret."""
    settings = get_settings()
    parts = urlsplit(settings.broker_url)
    user = unquote(parts.username or "")
    password = settings.passwords().get("broker")
    if not user or not password:
        raise click.ClickException(
            "no broker user or password: set PARKING_BROKER_URL with a user and "
            "write the parking_broker_password secret"
        )
    definitions = json.loads(template.read_text(encoding="utf-8"))
    rendered = with_user_password(definitions, user, password)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Only a salted hash is inside; the broker reads it as its own user.
    _write_private(out, json.dumps(rendered, indent=2) + "\n", 0o644)
    click.echo(f"wrote {out} for user {user}")
