#!/usr/bin/env bash
# The Ray head pod's one process under KubeRay: Ray's head node, then pdserve's control plane (and its router) on it.
#
#   pdserve-ray-head /etc/pdserve/cluster.yaml     # the container args in deploy/k8s/base/raycluster.yaml
#
# KubeRay (>= 1.1, with the RayCluster annotation ray.io/overwrite-container-cmd: "true") puts the `ray start --head
# ... --block` command it generated in $KUBERAY_GEN_RAY_START_CMD instead of running it. This script runs it in the
# background, waits for Ray's GCS to answer, then runs `pdserve up` beside it and waits on both. The config it reads
# has ray_address "auto", so pdserve joins this Ray (RAY_ADDRESS, set by KubeRay) instead of starting its own, and its
# worker actors land on the GPU worker pods (the head has num-cpus 0, so none land here).
#
# Whichever of the two exits first takes the other down and the container exits with its status, so Kubernetes
# restarts the pod as a unit: a router without its Ray (or a Ray without its router) is never left serving half.
# SIGTERM (pod deletion) goes to pdserve first, which stops its workers through Ray, and to Ray after.
set -uo pipefail

config="${1:?usage: pdserve-ray-head CLUSTER_YAML}"
ray_wait_s="${PDSERVE_RAY_WAIT_S:-120}"

if [ -z "${KUBERAY_GEN_RAY_START_CMD:-}" ]; then
  echo "pdserve-ray-head: \$KUBERAY_GEN_RAY_START_CMD is empty; this needs KubeRay >= 1.1 and the RayCluster" \
       "annotation ray.io/overwrite-container-cmd: \"true\"" >&2
  exit 2
fi

ray_pid=""
pdserve_pid=""

stop_all() {
  # pdserve first, so that it stops its worker actors while Ray is still there; then `ray start --block`, which
  # stops the Ray processes it started when it gets SIGTERM.
  if [ -n "$pdserve_pid" ] && kill -0 "$pdserve_pid" 2>/dev/null; then
    kill -TERM "$pdserve_pid" 2>/dev/null
    wait "$pdserve_pid" 2>/dev/null
  fi
  if [ -n "$ray_pid" ] && kill -0 "$ray_pid" 2>/dev/null; then
    kill -TERM "$ray_pid" 2>/dev/null
    wait "$ray_pid" 2>/dev/null
  fi
}

trap 'echo "pdserve-ray-head: stopping" >&2; stop_all; exit 0' TERM INT

# `ray start` must stay in the foreground of its subshell: it is how this script sees Ray die. KubeRay's command has
# --block; add it should a version leave it out.
ray_start="$KUBERAY_GEN_RAY_START_CMD"
case " $ray_start " in
  *" --block "* | *" --block="*) ;;
  *) ray_start="$ray_start --block" ;;
esac
# bash -c keeps the quoting KubeRay put in the command (a JSON --resources value, for one).
bash -c "$ray_start" &
ray_pid=$!

gcs="${RAY_ADDRESS:-127.0.0.1:6379}"
deadline=$((SECONDS + ray_wait_s))
while true; do
  if ray health-check --address "$gcs" >/dev/null 2>&1; then
    break
  fi
  if ! kill -0 "$ray_pid" 2>/dev/null; then
    wait "$ray_pid"
    status=$?
    echo "pdserve-ray-head: ray start exited ($status) before its GCS answered" >&2
    exit "$status"
  fi
  if ((SECONDS >= deadline)); then
    echo "pdserve-ray-head: Ray's GCS at $gcs did not answer in ${ray_wait_s} s" >&2
    stop_all
    exit 1
  fi
  sleep 1
done
echo "pdserve-ray-head: Ray head up at $gcs; starting pdserve" >&2

pdserve up --config "$config" &
pdserve_pid=$!

wait -n "$ray_pid" "$pdserve_pid"
status=$?
if kill -0 "$pdserve_pid" 2>/dev/null; then
  echo "pdserve-ray-head: Ray exited ($status); stopping pdserve" >&2
else
  echo "pdserve-ray-head: pdserve exited ($status); stopping Ray" >&2
fi
stop_all
exit "$status"
