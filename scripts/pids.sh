# Shared by start_pi0_models.sh and stop_pi0_models.sh (sourced, not run).

is_ours() {  # the PID is alive and runs a gpu_worker server (not merely a command line naming it)
  local pid=$1
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q -- "-m gpu_worker "
}

alive() {  # running, and not a zombie waiting to be reaped
  local state
  state=$(sed -n 's/^[0-9]* (.*) \([A-Z]\).*/\1/p' "/proc/$1/stat" 2>/dev/null || true)
  [ -n "$state" ] && [ "$state" != Z ] && [ "$state" != X ]
}
