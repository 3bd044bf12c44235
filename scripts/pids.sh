# Shared by start_pi0_models.sh and stop_pi0_models.sh (sourced, not run).

has_tag() {  # PID TAG: the process's environment holds PI0_MODEL_SERVER_TAG=TAG
  local environ
  environ=$( { tr '\0' '\n' <"/proc/$1/environ"; } 2>/dev/null) || return 1  # the process may be gone
  [[ $'\n'"$environ"$'\n' == *$'\n'"PI0_MODEL_SERVER_TAG=$2"$'\n'* ]]
}

is_ours() {  # PID TAG: the PID is alive and is the server start_pi0_models.sh started as TAG
  local pid=$1 tag=$2
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 1
  has_tag "$pid" "$tag" && return 0
  # A gpu_worker started by an older version of the script, before servers carried a tag.
  local environ cmdline
  environ=$( { tr '\0' '\n' <"/proc/$pid/environ"; } 2>/dev/null) || return 1
  cmdline=$( { tr '\0' ' ' <"/proc/$pid/cmdline"; } 2>/dev/null) || return 1
  [[ $'\n'"$environ" != *$'\n'PI0_MODEL_SERVER_TAG=* && "$cmdline" == *"-m gpu_worker "* ]]
}

group_ours() {  # PGID TAG: a live (not zombie) process of the process group PGID carries TAG
  local member
  for member in $(ps -e -o pgid=,pid=,stat= 2>/dev/null | awk -v g="$1" '$1 == g && $3 !~ /^Z/ { print $2 }'); do
    has_tag "$member" "$2" && return 0
  done
  return 1
}

alive() {  # running, and not a zombie waiting to be reaped
  local state
  state=$(sed -n 's/^[0-9]* (.*) \([A-Z]\).*/\1/p' "/proc/$1/stat" 2>/dev/null || true)
  [ -n "$state" ] && [ "$state" != Z ] && [ "$state" != X ]
}
