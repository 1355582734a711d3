#!/usr/bin/env bash
# Start a local Ray head with the dashboard and job server bound to 127.0.0.1 only.
#
#   bash cluster/start-local-head.sh
#   SFTRL_DASHBOARD_PORT=8266 bash cluster/start-local-head.sh --block   # extra args go to `ray start`
#
# Ports: SFTRL_GCS_PORT (6379), SFTRL_DASHBOARD_PORT (8265), SFTRL_DASHBOARD_AGENT_PORT (52365: the
# job agent's; with another Ray already on this machine, pick a free one, or jobs fail with
# "No available agent to submit job").
#
# then submit to it from the project root (README.md, "Running on a cluster"):
#
# cluster: cluster/start-local-head.sh (this machine; CPUs asked: 2 workers x 0.5 = 1)
#   RAY_AUTH_MODE=disabled ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
#       python -m sftrl.run configs/swissroll.yaml rollout.num_workers=2 --run-dir "$PWD/runs/swissroll-job"
#
# A GPU on this machine: the driver computes on it, so declare it (--entrypoint-num-gpus 1) and
# leave the actors' shares (rollout.num_gpus_per_worker, ray.learner_num_gpus, ...) room beside it.
#
# The dashboard and job server (8265) listen on loopback only. To reach them from another machine,
# forward the port over SSH (`ssh -L 8265:127.0.0.1:8265 HOST`) rather than binding it to a public
# address: the job server runs arbitrary code for whoever can reach it. Ray's other services do
# not stay on loopback (`ray start` swaps 127.0.0.1 for the machine's address): the GCS (6379),
# the Ray Client server (10001) and the dashboard agent listen there. On a machine an untrusted
# network reaches, firewall them or run every ray command with RAY_AUTH_MODE=token.
set -euo pipefail
export RAY_USAGE_STATS_ENABLED=0
# Ray turns token auth on once ~/.ray/auth_token exists; every ray command (start, job submit,
# stop) must then agree on RAY_AUTH_MODE. On loopback we default to disabled; export
# RAY_AUTH_MODE=token for every command to keep tokens on.
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-disabled}"
# The `ray` CLI, or SFTRL_RAY (e.g. "python3 -m ray.scripts.scripts") to pin the interpreter.
if [ -n "${SFTRL_RAY:-}" ]; then
  read -r -a RAY <<< "$SFTRL_RAY"
elif command -v ray > /dev/null; then
  RAY=(ray)
else
  RAY=(python3 -m ray.scripts.scripts)
fi
exec "${RAY[@]}" start --head \
  --node-ip-address=127.0.0.1 \
  --port="${SFTRL_GCS_PORT:-6379}" \
  --dashboard-host=127.0.0.1 \
  --dashboard-port="${SFTRL_DASHBOARD_PORT:-8265}" \
  --dashboard-agent-listen-port="${SFTRL_DASHBOARD_AGENT_PORT:-52365}" \
  --include-dashboard=true \
  "$@"
