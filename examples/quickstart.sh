#!/usr/bin/env bash
# Gateway quickstart: three replicas of two versions, and the gateway in front.
# Ctrl-C stops everything.
set -euo pipefail
cd "$(dirname "$0")/.."
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

cat <<'MSG'

  Stable URL:  http://scorer.fraud.localhost:8080/v1/predict
  Try:         curl -s -i http://scorer.fraud.localhost:8080/v1/predict -d '{"instances": [[1, 2, 3]]}'
  No DNS?      curl -s http://127.0.0.1:8080/serving/fraud/scorer/v1/predict -d '{"instances": [[1, 2, 3]]}'
  Metrics:     curl -s http://127.0.0.1:8081/metrics | grep gateway_requests_total
  Move traffic: edit examples/routes.yaml (weights), save; the gateway picks it up.

MSG
merlin-dp gateway --routes examples/routes.yaml --listen 127.0.0.1:8080 --admin 127.0.0.1:8081 &
pids+=($!)
wait
