#!/usr/bin/env bash
# Opt-in end-to-end check on a real Docker engine (minutes; not part of the test suite): builds
# both images, checks them (uid 10001, CLIs, OpenSlide, which torch build), brings up
# compose.yml + compose.demo.yml on two folders of real tiles (Kather 2016, from the shared data),
# waits for the federated run to finish and for its run_summary.json, then removes everything it
# made except the images. The last line is one JSON object with the timings and sizes.
#
#   docker/smoke.sh
#
# Environment: BASE_IMAGE and TORCH_WHEEL (build args, see README.md), HMGDM_DATA (default
# ../shared/data next to the repository), DOCKER (the docker CLI; it must build with BuildKit),
# COMPOSE (default `docker compose`, else `docker-compose`), TIMEOUT_S (default 1800).
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
data=${HMGDM_DATA:-$repo/../shared/data}
docker=${DOCKER:-docker}
timeout_s=${TIMEOUT_S:-1800}
tag=smoke
project=hmgdm-smoke
if [ -n "${COMPOSE:-}" ]; then
    read -r -a compose <<< "$COMPOSE"
elif "$docker" compose version > /dev/null 2>&1; then
    compose=("$docker" compose)
else
    compose=(docker-compose)
fi
tiles="$data/kather2016_tiles"
[ -d "$tiles" ] || { echo "error: $tiles not found (set HMGDM_DATA)" >&2; exit 2; }

work=$(mktemp -d /tmp/hmgdm-smoke.XXXXXX)
chmod 755 "$work"
dc() {
    (cd "$repo/docker" && HMGDM_TAG=$tag HOSPITAL_A_SLIDES="$work/a" HOSPITAL_B_SLIDES="$work/b" \
        "${compose[@]}" -p "$project" -f compose.yml -f compose.demo.yml "$@")
}
cleanup() {
    dc down --volumes --remove-orphans > /dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT
now() { date +%s.%N; }
since() { python3 -c "import sys; print(round(float(sys.argv[2]) - float(sys.argv[1]), 1))" "$1" "$(now)"; }
fail() { echo "FAIL: $*" >&2; dc logs --no-color --tail 40 >&2 || true; exit 1; }

# Two hospitals with different tissue classes (a non-IID split); plain tiles carry no mpp, so
# compose.demo.yml passes Kather's 0.495 µm/px. 08_EMPTY has no tissue and would fail graphs.
mkdir -p "$work/a" "$work/b"
cp -r "$tiles"/0[1-4]_* "$work/a/"
cp -r "$tiles"/0[5-7]_* "$work/b/"
chmod -R a+rX "$work"

declare -A build_s size_mb
for image in server client; do
    t0=$(now)
    DOCKER_BUILDKIT=1 "$docker" build -q -f "$repo/docker/Dockerfile.$image" \
        --build-arg "BASE_IMAGE=${BASE_IMAGE:-python:3.11-slim}" \
        --build-arg "TORCH_WHEEL=${TORCH_WHEEL:-}" -t "hmgdm-$image:$tag" "$repo" > /dev/null
    build_s[$image]=$(since "$t0")
    size_mb[$image]=$("$docker" image inspect -f '{{.Size}}' "hmgdm-$image:$tag" \
        | python3 -c "import sys; print(round(int(sys.stdin.read()) / 1e6))")
    echo "built hmgdm-$image:$tag in ${build_s[$image]} s, ${size_mb[$image]} MB"
done

run() { "$docker" run --rm "hmgdm-$1:$tag" "${@:2}"; }
[ "$(run server id -u)" = 10001 ] && [ "$(run client id -u)" = 10001 ] || fail "not uid 10001"
run server hmgdm-server --version
run client hmgdm-client --version
torch_build=$(run client python -c \
    "import openslide, torch; print(openslide.__library_version__, torch.__version__, torch.version.cuda)")
echo "client: OpenSlide, torch, CUDA = $torch_build"
variant=${TORCH_VARIANT:-cpu}
if [ "$variant" = cpu ]; then
    [ "${torch_build##* }" = None ] || fail "torch in the image is a CUDA build: $torch_build"
fi

t0=$(now)
# In the background: `up -d` itself waits for the SuperLink to be healthy, which is timed here.
dc up -d --no-build > "$work/up.log" 2>&1 &
up_pid=$!
health() { "$docker" inspect -f '{{.State.Health.Status}}' "$(dc ps -q "$1")" 2>/dev/null || true; }
state() {
    "$docker" inspect -f '{{.State.Status}} {{.State.ExitCode}}' "$(dc ps -q "$1")" 2>/dev/null \
        || echo missing
}
up_s=""; joined_s=""
while :; do
    [ "$(since "$t0" | cut -d. -f1)" -lt "$timeout_s" ] || fail "no finished run in $timeout_s s"
    if [ -z "$up_s" ] && [ "$(health superlink)" = healthy ]; then up_s=$(since "$t0"); fi
    if [ -z "$joined_s" ] && [ "$(health hospital-a)" = healthy ] \
        && [ "$(health hospital-b)" = healthy ]; then joined_s=$(since "$t0"); fi
    case "$(state superlink)" in
        "exited 0") break ;;
        exited*) ;;  # restart: on-failure brings it back; the timeout catches a loop
    esac
    sleep 2
done
run_s=$(since "$t0")
wait "$up_pid" || { cat "$work/up.log" >&2; fail "compose up failed"; }
for oneshot in certs keygen-a keygen-b graphs-a graphs-b; do
    [ "$(state "$oneshot")" = "exited 0" ] || fail "$oneshot: $(state "$oneshot")"
done
dc logs --no-color superlink | grep -E "registered hospital-(a|b)" || fail "no site registered"
summary=$("$docker" run --rm -v "${project}_federation:/state:ro" "hmgdm-server:$tag" \
    cat /state/runs/federated/run_summary.json)
echo "$summary" | python3 -c '
import json, sys
s = json.load(sys.stdin)
print("run:", s["status"], "rounds", s["rounds_aggregated"], "/", s["rounds_planned"],
      "sites", sorted(s["sites"]), "final loss", s["final_train_loss"])
for name, site in sorted(s["sites"].items()):
    print(" ", name, "replied", site["rounds_replied"], "epsilon", site["epsilon"])
ok = s["status"] == "finished" and s["rounds_aggregated"] == s["rounds_planned"] > 0
sys.exit(0 if ok and len(s["sites"]) == 2 else 1)' || fail "run summary: $summary"

python3 -c '
import json, sys
keys = ("build_server_s", "build_client_s", "size_server_mb", "size_client_mb",
        "up_to_superlink_healthy_s", "up_to_hospitals_healthy_s", "up_to_run_finished_s")
vals = [float(v) if v else None for v in sys.argv[1:]]
print(json.dumps({"benchmark": "docker_smoke", **dict(zip(keys, vals)),
                  "target": "images build, run finishes with 2 sites", "met": True}))' \
    "${build_s[server]}" "${build_s[client]}" "${size_mb[server]}" "${size_mb[client]}" \
    "$up_s" "$joined_s" "$run_s"
