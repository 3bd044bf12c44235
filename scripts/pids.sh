# Shared by start_pi0_models.sh and stop_pi0_models.sh (sourced, not run).

is_ours() {  # PID TAG: the PID is alive and is the server start_pi0_models.sh started as TAG
  local pid=$1 tag=$2
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && tr '\0' '\n' <"/proc/$pid/environ" 2>/dev/null | grep -qxF "PI0_MODEL_SERVER_TAG=$tag"
}

group_alive() {  # some process of the process group led by PID is still running (zombies aside)
  ps -e -o pgid=,stat= 2>/dev/null | awk -v g="$1" '$1 == g && $2 !~ /^Z/ { found = 1 } END { exit !found }'
}

alive() {  # running, and not a zombie waiting to be reaped
  local state
  state=$(sed -n 's/^[0-9]* (.*) \([A-Z]\).*/\1/p' "/proc/$1/stat" 2>/dev/null || true)
  [ -n "$state" ] && [ "$state" != Z ] && [ "$state" != X ]
}
