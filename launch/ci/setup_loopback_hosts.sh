#!/usr/bin/env bash
# Two "hosts" on this machine for the multi-node tests (tests/multinode/): an sshd on each of
# the loopback addresses 127.0.0.1 and 127.0.0.2 (own port, throwaway keys), pdsh, and a
# DeepSpeed/Open MPI hostfile naming both. The second host's sshd runs in its own UTS namespace
# with its own hostname where the kernel permits it (Open MPI and mpi4py tell nodes apart by
# hostname), and every ssh session gets its host's own TMPDIR (separate machines have separate
# /tmp). Nothing under ~/.ssh or /etc/ssh is changed: the client side is an ssh config file in
# the state dir, applied by an `ssh` wrapper that env.sh puts first on PATH.
#
# Usage (as root; Debian/Ubuntu apt installs openssh-server and pdsh when missing):
#   bash launch/ci/setup_loopback_hosts.sh            # idempotent; ~1 s when already up
#   bash launch/ci/setup_loopback_hosts.sh --stop     # stop the sshds (state dir kept)
#   bash launch/ci/setup_loopback_hosts.sh --purge    # stop them and delete the state dir
#   source "$MTNLG_LOOPBACK_DIR/env.sh"               # PATH (ssh wrapper), PDSH_RCMD_TYPE=ssh
#
# Environment: MTNLG_LOOPBACK_DIR state dir [/tmp/mtnlg-loopback], MTNLG_LOOPBACK_PORT [2222],
# MTNLG_LOOPBACK_SLOTS slots per host [2].
# State dir: hostfile, ssh_config, bin/ssh, env.sh, keys, known_hosts, hostnames (one
# "ADDRESS HOSTNAME" line per host), and per host sshd_config.ADDR, sshd.ADDR.pid, sshd.ADDR.log
# (which records each connection and the address it arrived on).
set -euo pipefail

STATE=${MTNLG_LOOPBACK_DIR:-/tmp/mtnlg-loopback}
PORT=${MTNLG_LOOPBACK_PORT:-2222}
SLOTS=${MTNLG_LOOPBACK_SLOTS:-2}
HOSTS=(127.0.0.1 127.0.0.2)

stop_sshd() {
  local h pid
  for h in "${HOSTS[@]}"; do
    [[ -f "$STATE/sshd.$h.pid" ]] || continue
    pid=$(cat "$STATE/sshd.$h.pid")
    # only the sshd this script started: its pid file and its config on the command line
    if [[ -r /proc/$pid/cmdline ]] && tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q -- "$STATE/sshd_config.$h"; then
      kill "$pid"
      for _ in $(seq 50); do [[ -e /proc/$pid ]] || break; sleep 0.1; done
    fi
    rm -f "$STATE/sshd.$h.pid"
  done
}

case "${1:-}" in
  --stop) stop_sshd; exit 0 ;;
  --purge) stop_sshd; rm -rf "$STATE"; exit 0 ;;
  "") ;;
  *) echo "usage: $0 [--stop|--purge]" >&2; exit 2 ;;
esac

if [[ $(id -u) -ne 0 ]]; then
  echo "error: $0 must run as root (it starts sshd and logs in as root over the loopback)" >&2
  exit 1
fi

# 1. packages, only when missing
missing=()
[[ -x /usr/sbin/sshd ]] || missing+=(openssh-server)
command -v ssh-keygen >/dev/null || missing+=(openssh-client)
command -v pdsh >/dev/null || missing+=(pdsh)
if ((${#missing[@]})); then
  echo "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # the package's own sshd on port 22 is not used (policy-rc.d in containers refuses to start it)
  apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null ||
    { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null; }
fi

# 2. keys (once) and configs (rewritten each time; sshd restarted when they change)
mkdir -p "$STATE/bin" && chmod 700 "$STATE"
[[ -f "$STATE/host_ed25519" ]] || ssh-keygen -q -t ed25519 -N '' -C mtnlg-loopback-host -f "$STATE/host_ed25519"
[[ -f "$STATE/id_ed25519" ]] || ssh-keygen -q -t ed25519 -N '' -C mtnlg-loopback-client -f "$STATE/id_ed25519"
cp "$STATE/id_ed25519.pub" "$STATE/authorized_keys"

for h in "${HOSTS[@]}"; do
  mkdir -p "$STATE/hosts/$h/tmp"
  cat >"$STATE/sshd_config.$h.new" <<CFG
Port $PORT
ListenAddress $h
HostKey $STATE/host_ed25519
AuthorizedKeysFile $STATE/authorized_keys
PidFile $STATE/sshd.$h.pid
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
X11Forwarding no
LogLevel VERBOSE
MaxStartups 100:30:200
MaxSessions 100
AcceptEnv TMPDIR
CFG
done

{
  for h in "${HOSTS[@]}"; do printf 'Host %s\n  SetEnv TMPDIR=%s\n' "$h" "$STATE/hosts/$h/tmp"; done
  cat <<CFG
Host ${HOSTS[*]}
  Port $PORT
  User root
  IdentityFile $STATE/id_ed25519
  IdentitiesOnly yes
  UserKnownHostsFile $STATE/known_hosts
  StrictHostKeyChecking accept-new
  BatchMode yes
  ConnectTimeout 10
  LogLevel ERROR
CFG
} >"$STATE/ssh_config"

cat >"$STATE/bin/ssh" <<SH
#!/bin/sh
# ssh with the loopback hosts' port, key and known_hosts: used by DeepSpeed, pdsh and mpirun
exec /usr/bin/ssh -F "$STATE/ssh_config" "\$@"
SH
chmod +x "$STATE/bin/ssh"

cat >"$STATE/env.sh" <<SH
# source me: the loopback hosts' ssh first on PATH, and pdsh over ssh
export PATH="$STATE/bin:\$PATH"
export PDSH_RCMD_TYPE=ssh
SH

for h in "${HOSTS[@]}"; do echo "$h slots=$SLOTS"; done >"$STATE/hostfile.new"
mv "$STATE/hostfile.new" "$STATE/hostfile"

# 3. one sshd per host; restarted only when its config changed or it does not answer
probe() { "$STATE/bin/ssh" -o ConnectTimeout=3 "$1" hostname 2>/dev/null; }
: >"$STATE/hostnames.new"
for i in "${!HOSTS[@]}"; do
  h=${HOSTS[$i]}
  cfg=$STATE/sshd_config.$h
  if cmp -s "$cfg.new" "$cfg" && name=$(probe "$h"); then
    rm "$cfg.new"
  else
    mv "$cfg.new" "$cfg"
    pid_file=$STATE/sshd.$h.pid
    if [[ -f "$pid_file" ]] && tr '\0' ' ' <"/proc/$(cat "$pid_file")/cmdline" 2>/dev/null | grep -q -- "$cfg"; then
      kill "$(cat "$pid_file")" && sleep 0.3
    fi
    mkdir -p /run/sshd && chmod 755 /run/sshd # privilege separation dir
    /usr/sbin/sshd -t -f "$cfg"
    start=(/usr/sbin/sshd -f "$cfg" -E "$STATE/sshd.$h.log")
    # hosts after the first get their own hostname when a UTS namespace can be made
    if ((i > 0)) && unshare --uts true 2>/dev/null; then
      unshare --uts sh -c 'hostname "$0" && exec "$@"' "mtnlg-loopback-$((i + 1))" "${start[@]}"
    else
      "${start[@]}"
    fi
    for try in $(seq 50); do
      name=$(probe "$h") && break
      ((try < 50)) || { echo "error: sshd on $h:$PORT not reachable; see $STATE/sshd.$h.log" >&2; exit 1; }
      sleep 0.1
    done
  fi
  echo "$h $name" >>"$STATE/hostnames.new"
done
mv "$STATE/hostnames.new" "$STATE/hostnames"
echo "loopback hosts ready (sshd port $PORT): $(paste -sd, "$STATE/hostnames");" \
  "hostfile $STATE/hostfile; source $STATE/env.sh"
