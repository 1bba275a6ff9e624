#!/usr/bin/env bash
# Checks that RabbitMQ and Redis answer on their local ports; says how to
# start them when they do not. Used by `make test` and `make run`.
set -u
ok=1
if ! (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null; then
  echo "RabbitMQ is not listening on 127.0.0.1:5672 — start it with: rabbitmq-server -detached" >&2
  ok=0
fi
if ! (exec 3<>/dev/tcp/127.0.0.1/6379) 2>/dev/null; then
  echo "Redis is not listening on 127.0.0.1:6379 — start it with: redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save \"\" --appendonly no" >&2
  ok=0
fi
[ "$ok" = 1 ] || exit 1
echo "RabbitMQ and Redis are up."
