#!/usr/bin/env bash
# Several nodes listed in a hostfile, started by the deepspeed launcher (pdsh over passwordless ssh).
#
# Use when: you have a fixed set of machines that reach each other by ssh without a password, and pdsh
# installed on the node you launch from. One command on that node starts every rank on every host.
#
#   cp launch/hostfile.example launch/hostfile   # then list your nodes and their GPUs
#   launch/deepspeed_hostfile.sh model=qwen3_14b curriculum=qwen3 deepspeed=zero3 \
#       model.activation_checkpointing=true run_dir=/shared/runs/qwen3_14b
#   HOSTFILE=/etc/hosts.gpu launch/deepspeed_hostfile.sh ...
#
# Variables: HOSTFILE (hostfile beside this script), MASTER_PORT (29500), MASTER_ADDR (the rendezvous address;
# default: the first host's first address as `hostname -I` lists it there, so set it where that is not the
# network the nodes share), DS_ENV_FILE (the name of that file, checked as DeepSpeed reads it). The first host is the rendezvous master.
# --no_local_rank: ranks read LOCAL_RANK from the environment rather than a `--local_rank=N` argument,
# which Hydra would take for an override. Environment variables the remote ranks need (NCCL_*, PATH of
# the virtual environment) go into a `.deepspeed_env` file (KEY=VALUE lines only: no comments, no blank
# lines, no secrets; checked) in this directory or $HOME.
# run_dir must be on a file system all hosts share. The launcher exits with the largest exit code of the
# hosts (pdsh -S), so 75 after a SIGTERM checkpoint comes through: relaunch the same command to resume.
set -euo pipefail

# The deepspeed launcher prints its whole command line (and pdsh the environment it exports): a secret given as an
# override would reach the console and the job's log. wandb reads WANDB_API_KEY from each node's environment.
secret='([Aa][Pp][Ii][_-]?[Kk][Ee][Yy]|[Tt][Oo][Kk][Ee][Nn]|[Ss][Ee][Cc][Rr][Ee][Tt]|[Pp][Aa][Ss][Ss][Ww][Oo][Rr][Dd])$'
inline='([Aa][Pp][Ii][_-]?[Kk][Ee][Yy]|[Tt][Oo][Kk][Ee][Nn]|[Ss][Ee][Cc][Rr][Ee][Tt]|[Pp][Aa][Ss][Ss][Ww][Oo][Rr][Dd])[[:space:]]*:'
for arg in "$@"; do
  key=${arg%%=*}
  # the key itself (logging.wandb.api_key=...), or one inside a dict value (logging.wandb={api_key: ...})
  if [[ "$arg" == *=* && ( "${key##*.}" =~ $secret || "${arg#*=}" =~ $inline ) ]]; then
    echo "error: ${key#[+~]} on the deepspeed launcher's command line would be printed by the launcher; set it in" \
      "each node's environment instead (WANDB_API_KEY for logging.wandb.api_key)" >&2
    exit 2
  fi
done

HOSTFILE=${HOSTFILE:-$(dirname "${BASH_SOURCE[0]}")/hostfile}
if [[ ! -f "$HOSTFILE" ]]; then
  echo "no hostfile at $HOSTFILE: copy launch/hostfile.example and list your hosts" >&2
  exit 2
fi

# Each line as DeepSpeed reads it, `<host> slots=<N>`: it would start no rank on a host of 0 slots (all of them 0:
# nothing trains and the launcher exits 0) and meets a malformed line with a traceback that names no file
n=0
declare -A seen=()
while IFS= read -r line || [[ -n $line ]]; do
  n=$((n + 1))
  [[ $line =~ ^[[:space:]]*(#|$) ]] && continue
  if [[ ! $line =~ ^[[:space:]]*([^[:space:]]+)[[:space:]]+slots=([0-9]+) ]] || ((10#${BASH_REMATCH[2]} < 1)); then
    echo "error: $HOSTFILE line $n: '$line': expected '<host> slots=<GPUs on it, at least 1>'" >&2
    exit 2
  fi
  if [[ -n ${seen[${BASH_REMATCH[1]}]:-} ]]; then
    echo "error: $HOSTFILE line $n: host ${BASH_REMATCH[1]} is listed again (first on line ${seen[${BASH_REMATCH[1]}]})" >&2
    exit 2
  fi
  seen[${BASH_REMATCH[1]}]=$n
done < "$HOSTFILE"
if ((${#seen[@]} == 0)); then
  echo "error: $HOSTFILE lists no host: one '<host> slots=<GPUs>' line per node (launch/hostfile.example)" >&2
  exit 2
fi

# A hostfile naming only this machine (`localhost slots=8`, to pick the slot count) runs locally without ssh:
# deepspeed would otherwise ssh to it first, to check it and to look up its address.
extra=()
hosts=$(awk '!/^[[:space:]]*(#|$)/ {print $1}' "$HOSTFILE" | sort -u)
if [[ "$hosts" == "localhost" || "$hosts" == "127.0.0.1" ]]; then
  extra+=(--no_ssh_check --master_addr=127.0.0.1)
elif [[ -n ${MASTER_ADDR:-} ]]; then  # else deepspeed takes the first host's first `hostname -I` address
  extra+=(--master_addr="$MASTER_ADDR")
fi

args=("$@")
if (($(wc -l <<<"$hosts") > 1)); then
  # Over pdsh, which DeepSpeed uses for more than one host (one host's ranks it starts here, without a shell),
  # every remote shell parses the command line again, and DeepSpeed quotes only arguments with a space
  # (in "..."): `${name}`, `{a: 1, b: 2}` or `a;b` would be expanded, split or run there. Quote each argument so
  # that it arrives as given: single quotes around one without a space; in one with a space, which DeepSpeed
  # puts in double quotes, the characters those still expand escaped.
  args=()
  for a in "$@"; do
    if [[ $a == *" "* ]]; then
      a=${a//\\/\\\\}; a=${a//\$/\\\$}; a=${a//\`/\\\`}  # DeepSpeed escapes the " itself
    else
      a="'${a//\'/\'\\\'\'}'"
    fi
    args+=("$a")
  done

  # DeepSpeed pastes each `.deepspeed_env` line into the remote command as `export <line>;` (and prints it): a
  # comment or blank line would break that command (a comment swallows the rest: every host runs nothing and
  # the launcher exits 0), and a secret would be printed
  # (DeepSpeed reads the file named by DS_ENV_FILE instead, in this directory and in $HOME, as it does this one)
  for env_file in "${DS_ENV_FILE:-.deepspeed_env}" "$HOME/${DS_ENV_FILE:-.deepspeed_env}"; do
    [[ -f $env_file ]] || continue
    n=0
    while IFS= read -r line || [[ -n $line ]]; do
      n=$((n + 1))
      if [[ ! $line =~ ^[A-Za-z_][A-Za-z0-9_]*= ]]; then
        echo "error: $env_file line $n: DeepSpeed reads every line as KEY=VALUE (no comments, no blank lines)" >&2
        exit 2
      fi
      if [[ ${line%%=*} =~ $secret ]]; then
        echo "error: $env_file line $n: ${line%%=*} would be printed by the deepspeed launcher; set it in each" \
          "node's environment (its shell profile) instead" >&2
        exit 2
      fi
    done < "$env_file"
  done
fi

exec deepspeed --hostfile="$HOSTFILE" --master_port="${MASTER_PORT:-29500}" "${extra[@]}" \
  --no_local_rank --module train "${args[@]}"
