#!/bin/sh
# Start Redis with its password from a secret file, given only as a SHA-256
# ACL entry on stdin: the password is on no command line and in no config file.
# Usage: start.sh <redis-server command and arguments>
# (a "-" is appended, which makes Redis read the rest of its config from stdin).
set -eu

secret="${REDIS_PASSWORD_FILE:-/run/secrets/parking_redis_password}"
if [ ! -s "$secret" ]; then
  echo "redis start: no password in $secret; run: parking secrets init" >&2
  exit 1
fi
# Clients read the file with surrounding whitespace stripped; $(...) drops
# trailing newlines, and the generated secrets hold no other whitespace.
digest=$(printf '%s' "$(cat "$secret")" | sha256sum | cut -d ' ' -f 1)

# A here-document, not a pipe: exec must replace this shell so that Redis
# gets the container's stop signal and flushes its append-only file.
exec "$@" - <<ACL
user default on #$digest ~* &* +@all
ACL
