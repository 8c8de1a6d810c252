#!/usr/bin/env bash
# Gateway quickstart without the controller: three replicas of two versions (ports
# 9001-9003) and a gateway in front on merlin-dp up's own ports, 8080 (traffic) and 8081
# (admin), following examples/routes.yaml. Stop a running `merlin-dp up` first, or set
# GATEWAY_PORT / ADMIN_PORT. Ctrl-C stops everything.
set -euo pipefail
cd "$(dirname "$0")/.."
GATEWAY_PORT=${GATEWAY_PORT:-8080}
ADMIN_PORT=${ADMIN_PORT:-8081}
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM

start_replica() {  # port version
  CARAML_HTTP_PORT=$1 CARAML_MODEL_NAME=scorer CARAML_MODEL_VERSION=$2 \
  CARAML_MODEL_FULL_NAME=scorer-$2 python3 examples/custom_model.py &
  pids+=($!)
}
start_replica 9001 1
start_replica 9002 1
start_replica 9003 2

cat <<MSG

  Stable URL:  http://scorer.fraud.localhost:$GATEWAY_PORT/v1/predict
  Try:         curl -s -i http://scorer.fraud.localhost:$GATEWAY_PORT/v1/predict -d '{"instances": [[1, 2, 3]]}'
  No DNS?      curl -s http://127.0.0.1:$GATEWAY_PORT/serving/fraud/scorer/v1/predict -d '{"instances": [[1, 2, 3]]}'
  Metrics:     curl -s http://127.0.0.1:$ADMIN_PORT/metrics | grep gateway_requests_total
  Move traffic: edit examples/routes.yaml (weights), save; the gateway picks it up.

MSG
merlin-dp gateway --routes examples/routes.yaml --listen 127.0.0.1:$GATEWAY_PORT --admin 127.0.0.1:$ADMIN_PORT &
pids+=($!)
wait
