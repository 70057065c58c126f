#!/bin/sh
# Submission + relay, Postfix against mailplat: starts a throwaway Postfix
# (submission with STARTTLS and SASL AUTH PLAIN through a throwaway Dovecot
# auth service, relayhost = the sink of relay.py), then runs
# benchmarks/relay.py against it and against mailplat, interleaved, and
# prints the medians.
#
#   benchmarks/postfix_relay.sh            # 3 rounds x 50 clients x 20 x 1 KB
#   ROUNDS=5 MESSAGES=100 benchmarks/postfix_relay.sh
#
# Environment: ROUNDS (3), CLIENTS (50), MESSAGES (20, per client), SIZE
# (1024 bytes), IN_FLOW_DELAY (Postfix's default 1s), PYTHON (python3),
# POSTFIX, POSTCONF, DOVECOT (the binaries), KEEP=1 keeps the instance
# folder (logs, results) after the run, PASSWORD_HASH (see below).
#
# PASSWORD_HASH: how both servers store the test user's password.
# - plain (default): {PLAIN} in Dovecot's passwd-file and in mailplat's
#   (relay.py --password-scheme plain): logins cost nothing on either side,
#   so the mail path itself is compared.
# - argon2id: the hash mailplat's `user add` makes, on both sides (Dovecot
#   verifies the PHC string as it is), so logins cost the same. But Dovecot's auth process verifies one password at a time,
#   and Postfix waits at most 10 s (fixed in its source) for Dovecot's answer:
#   with 50 clients logging in at once on a busy 2-core machine the last ones
#   get "454 4.7.0 Temporary authentication failure: Connection lost to
#   authentication server" and relay.py stops. Use CLIENTS=20 or fewer.
#
# Everything (main.cf, master.cf, queue, data, Postfix and Dovecot logs,
# certificate, users file, Dovecot's base_dir) lives in one temp folder,
# /tmp/mailplat-bench-postfix-relay.XXXXXX, removed on exit. The system-wide
# Postfix and Dovecot (/etc/postfix, /var/spool/postfix, /etc/dovecot,
# /run/dovecot) are never touched: Postfix runs with `postfix -c DIR/etc` and
# its own queue_directory, Dovecot with `dovecot -c DIR/dovecot.conf` and its
# own base_dir. Postfix listens only on 127.0.0.1:<free port>, Dovecot only on
# a unix socket in the folder. Both are stopped on exit, Ctrl-C included.
# Must run as root (both masters insist on it).
#
# Postfix keeps its defaults wherever they bear on the result: cleanup fsyncs
# the queue file before smtpd answers 250, in_flow_delay = 1s,
# initial_destination_concurrency = 5 growing to
# default_destination_concurrency_limit = 20 connections to the relayhost,
# connection caching to the relayhost on demand. smtp_tls_security_level =
# may, like Debian's stock main.cf and like mailplat's [relay] tls =
# "opportunistic" (the sink offers no STARTTLS, so neither encrypts).
set -eu
. "$(dirname "$0")/_lib.sh"

POSTFIX=${POSTFIX:-/usr/sbin/postfix}
POSTCONF=${POSTCONF:-/usr/sbin/postconf}
DOVECOT=${DOVECOT:-/usr/sbin/dovecot}
PYTHON=${PYTHON:-python3}
ROUNDS=${ROUNDS:-3}
CLIENTS=${CLIENTS:-50}
MESSAGES=${MESSAGES:-20}
SIZE=${SIZE:-1024}
IN_FLOW_DELAY=${IN_FLOW_DELAY:-1s}
PASSWORD_HASH=${PASSWORD_HASH:-plain}
BENCH_USER=bench@bench.test
BENCH_PASSWORD=bench-password

here=$(cd "$(dirname "$0")" && pwd)
relay_py=$here/relay.py
venv=$(cd "$here/.." && pwd)/.venv

for n in "$ROUNDS" "$CLIENTS" "$MESSAGES" "$SIZE"; do
    case $n in
        ''|*[!0-9]*) echo "ROUNDS, CLIENTS, MESSAGES and SIZE must be numbers" >&2; exit 2 ;;
    esac
done
if [ "$ROUNDS" -lt 1 ] || [ "$CLIENTS" -lt 1 ] || [ "$MESSAGES" -lt 1 ]; then
    echo "ROUNDS, CLIENTS and MESSAGES must be at least 1" >&2
    exit 2
fi
case $PASSWORD_HASH in
    argon2id|plain) ;;
    *) echo "PASSWORD_HASH must be argon2id or plain" >&2; exit 2 ;;
esac
if [ "$(id -u)" != 0 ]; then
    echo "$0 must run as root: Postfix's and Dovecot's masters refuse to start otherwise" >&2
    echo "run: sudo $0" >&2
    exit 1
fi
if [ ! -x "$POSTFIX" ]; then
    echo "Postfix is not installed: apt-get install -y postfix" >&2
    exit 1
fi
if [ ! -x "$DOVECOT" ]; then
    echo "Dovecot is not installed (its auth service does SASL for Postfix): apt-get install -y dovecot-core" >&2
    exit 1
fi
if [ ! -x "$venv/bin/twistd" ]; then
    echo "relay.py runs mailplat from $venv: create it first (make test)" >&2
    exit 1
fi

dir=
postfix_pid=
dovecot_pid=

# Two distinct free loopback ports (bound to port 0, then released).
free_ports() {
    "$PYTHON" - <<'EOF'
import socket
socks = [socket.socket() for _ in range(2)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))
EOF
}

# Messages still in the Postfix queue (incoming, active, deferred, ...).
queued() {
    find "$dir/queue/maildrop" "$dir/queue/incoming" "$dir/queue/active" \
        "$dir/queue/deferred" "$dir/queue/hold" -type f 2>/dev/null | wc -l
}

# Connections between Postfix's smtp client (or its connection cache) and the
# sink port, in any state.
sink_connections() {
    ss -Htan "( dport = :$sink_port )" 2>/dev/null | grep -vc TIME-WAIT || true
}

cleanup() {
    status=$?
    trap - EXIT INT TERM
    if [ -n "$dir" ] && [ -s "$dir/queue/pid/master.pid" ]; then
        postfix_pid=$(tr -d ' \n' < "$dir/queue/pid/master.pid")
        "$POSTFIX" -c "$dir/etc" stop >/dev/null 2>&1 || true
        if ! wait_for "! kill -0 $postfix_pid 2>/dev/null" 100; then
            echo "Postfix master $postfix_pid still running after 10 s; sending SIGKILL" >&2
            "$POSTFIX" -c "$dir/etc" abort >/dev/null 2>&1 || kill -9 "$postfix_pid" 2>/dev/null || true
        fi
    fi
    if [ -n "$dir" ] && [ -s "$dir/run/master.pid" ]; then
        dovecot_pid=$(tr -d ' \n' < "$dir/run/master.pid")
        kill "$dovecot_pid" 2>/dev/null || true
        if ! wait_for "! kill -0 $dovecot_pid 2>/dev/null" 100; then
            echo "Dovecot master $dovecot_pid still running after 10 s; sending SIGKILL" >&2
            kill -9 "$dovecot_pid" 2>/dev/null || true
        fi
    fi
    case $dir in
        /tmp/mailplat-bench-postfix-relay.*)
            if [ "${KEEP:-0}" = 1 ]; then
                echo "kept $dir" >&2
            else
                rm -rf "$dir"
            fi ;;
        '') ;;
        *) echo "refusing to remove unexpected folder $dir" >&2 ;;
    esac
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

show_logs() {
    echo "$1" >&2
    for f in start.log maillog dovecot.log; do
        if [ -s "$dir/$f" ]; then
            echo "--- $dir/$f (last lines)" >&2
            tail -n 20 "$dir/$f" >&2
        fi
    done
}

dir=$(mktemp -d /tmp/mailplat-bench-postfix-relay.XXXXXX)
chmod 755 "$dir"
set -- $(free_ports)
submission_port=$1
sink_port=$2
mkdir -p "$dir/etc" "$dir/queue" "$dir/data" "$dir/run" "$dir/state" "$dir/tls"
chown postfix "$dir/data"

# --- certificate and users file
if ! openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=bench.test" \
        -keyout "$dir/tls/key.pem" -out "$dir/tls/cert.pem" >"$dir/tls/openssl.log" 2>&1; then
    cat "$dir/tls/openssl.log" >&2
    show_logs "openssl could not make a self-signed certificate"
    exit 1
fi
chmod 600 "$dir/tls/key.pem"
case $PASSWORD_HASH in
    argon2id)
        # mailplat's own hasher, so both servers check the same argon2id
        # parameters at login (Dovecot verifies the PHC string as it is).
        stored=$(printf '%s' "$BENCH_PASSWORD" | "$venv/bin/python" -c \
            'import sys; from mailplat.passwords import hash_password; print(hash_password(sys.stdin.read()))') ;;
    plain) stored="{PLAIN}$BENCH_PASSWORD" ;;
esac
printf '%s:%s\n' "$BENCH_USER" "$stored" > "$dir/users"
# read by the auth process, which runs as default_internal_user
chgrp dovecot "$dir/users"
chmod 640 "$dir/users"

# --- Dovecot: the auth service only, on one unix socket Postfix's smtpd can reach.
# Start from nothing, so no setting leaks in from /etc/dovecot.
cat > "$dir/dovecot.conf" <<EOF
base_dir = $dir/run
state_dir = $dir/state
log_path = $dir/dovecot.log
instance_name = mailplat-bench-postfix-relay
protocols = none
# no protocols, hence no inet listeners; this only keeps any default off the network
listen = 127.0.0.1
ssl = no
auth_mechanisms = plain
default_internal_user = dovecot
default_login_user = dovenull
service auth {
  unix_listener auth-postfix {
    mode = 0660
    user = postfix
    group = postfix
  }
}
passdb {
  driver = passwd-file
  args = $dir/users
}
userdb {
  driver = static
  args = uid=nobody gid=nogroup home=/nonexistent
}
EOF
if ! "$DOVECOT" -c "$dir/dovecot.conf" >>"$dir/start.log" 2>&1; then
    show_logs "dovecot did not start"
    exit 1
fi
if ! wait_for "[ -s '$dir/run/master.pid' ] && [ -S '$dir/run/auth-postfix' ]" 100; then
    show_logs "Dovecot did not create its auth socket $dir/run/auth-postfix"
    exit 1
fi

# --- Postfix: submission on 127.0.0.1:$submission_port, relays everything
# from authenticated clients to [127.0.0.1]:$sink_port.
# main.cf: start from nothing, so no setting leaks in from /etc/postfix. The
# submission settings sit in main.cf rather than as master.cf -o overrides:
# this instance has no other listener.
cat > "$dir/etc/main.cf" <<EOF
compatibility_level = 3.6
queue_directory = $dir/queue
data_directory = $dir/data
mail_owner = postfix
setgid_group = postdrop
myhostname = bench.test
mydomain = bench.test
myorigin = bench.test
mydestination =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
alias_maps =
alias_database =
local_recipient_maps =
biff = no
smtpd_banner = \$myhostname ESMTP benchmark
maillog_file = $dir/maillog
maillog_file_prefixes = $dir
# submission: TLS first, then AUTH PLAIN checked by Dovecot, then relay
smtpd_tls_security_level = encrypt
smtpd_tls_chain_files = $dir/tls/key.pem, $dir/tls/cert.pem
smtpd_sasl_auth_enable = yes
smtpd_sasl_type = dovecot
smtpd_sasl_path = $dir/run/auth-postfix
smtpd_relay_restrictions = permit_sasl_authenticated, reject
relayhost = [127.0.0.1]:$sink_port
smtp_tls_security_level = may
message_size_limit = 52428800
# all clients are local: no per-client limits in the way of the benchmark
smtpd_client_event_limit_exceptions = 127.0.0.0/8
in_flow_delay = $IN_FLOW_DELAY
EOF

{ echo "127.0.0.1:$submission_port inet n - n - - smtpd"; postfix_services; } > "$dir/etc/master.cf"

# The postfix command prints its fatal errors only when stderr is a terminal
# (otherwise only to the log), so check first and show why.
if ! "$POSTFIX" -c "$dir/etc" check >>"$dir/start.log" 2>&1; then
    command -v script >/dev/null && script -qc "$POSTFIX -c $dir/etc check" /dev/null >>"$dir/start.log" 2>&1
    show_logs "postfix check failed"
    exit 1
fi
if ! "$POSTFIX" -c "$dir/etc" start >>"$dir/start.log" 2>&1; then
    show_logs "postfix start failed"
    exit 1
fi
if ! wait_for "[ -s '$dir/queue/pid/master.pid' ] && banner_is $submission_port 220" 100; then
    show_logs "Postfix did not start listening on 127.0.0.1:$submission_port"
    exit 1
fi
version=$("$POSTCONF" -c "$dir/etc" -h mail_version)
echo "Postfix $version on 127.0.0.1:$submission_port relaying to [127.0.0.1]:$sink_port; instance in $dir" >&2
echo "load: $ROUNDS rounds of $CLIENTS clients x $MESSAGES messages x $SIZE bytes, each server once per round" >&2

run_postfix() {
    # The previous Postfix run's cached connections to the sink (kept up to
    # smtp_connection_cache_time_limit = 2s) lead to a sink that is gone;
    # wait until they are closed so the next run starts from a clean slate.
    if ! wait_for "[ \"\$(sink_connections)\" = 0 ]" 100; then
        echo "Postfix still holds connections to the old sink port $sink_port" >&2
    fi
    if ! "$PYTHON" "$relay_py" --target "127.0.0.1:$submission_port" --user "$BENCH_USER" \
            --password "$BENCH_PASSWORD" --sink-port "$sink_port" \
            -c "$CLIENTS" -m "$MESSAGES" -s "$SIZE" --json > "$dir/last.json"; then
        show_logs "relay.py against Postfix failed"
        exit 1
    fi
    printf 'postfix %s\n' "$(cat "$dir/last.json")" >> "$dir/results"
    echo "round $round postfix:  $(cat "$dir/last.json")" >&2
    left=$(queued)
    if [ "$left" != 0 ]; then
        echo "warning: $left messages still in Postfix's queue after the sink had them all" >&2
    fi
}

run_mailplat() {
    if ! "$PYTHON" "$relay_py" -c "$CLIENTS" -m "$MESSAGES" -s "$SIZE" --password-scheme "$PASSWORD_HASH" --json > "$dir/last.json"; then
        echo "relay.py against mailplat failed" >&2
        exit 1
    fi
    printf 'mailplat %s\n' "$(cat "$dir/last.json")" >> "$dir/results"
    echo "round $round mailplat: $(cat "$dir/last.json")" >&2
}

: > "$dir/results"
round=1
while [ "$round" -le "$ROUNDS" ]; do
    # Alternate which server goes first, so neither always runs on a machine
    # still busy with the other's leftovers (page cache, fsync backlog).
    if [ $((round % 2)) = 1 ]; then
        run_postfix
        run_mailplat
    else
        run_mailplat
        run_postfix
    fi
    round=$((round + 1))
done

"$PYTHON" - "$dir/results" "$version" "$PASSWORD_HASH" <<'EOF'
import json, statistics, sys

runs = {"postfix": [], "mailplat": []}
for line in open(sys.argv[1]):
    name, _, data = line.partition(" ")
    runs[name].append(json.loads(data))
keys = [("accepted_msgs_per_s", "accepted msg/s"), ("relayed_msgs_per_s", "relayed msg/s"),
        ("submit_p50_ms", "submit p50 ms"), ("submit_p99_ms", "submit p99 ms")]


def cell(name, key):
    values = [r[key] for r in runs[name]]
    return f"{statistics.median(values):g} ({min(values):g}-{max(values):g})"


def median(name, key):
    return statistics.median(r[key] for r in runs[name])


rows = [[f"Postfix {sys.argv[2]}"] + [cell("postfix", k) for k, _ in keys],
        ["mailplat"] + [cell("mailplat", k) for k, _ in keys],
        ["mailplat/Postfix"] + [f"{median('mailplat', k) / median('postfix', k):.2f}" for k, _ in keys]]
header = ["median (min-max)"] + [title for _, title in keys]
widths = [max(len(row[i]) for row in rows + [header]) for i in range(len(header))]
print(f"{len(runs['postfix'])} rounds, {runs['postfix'][0]['messages']} messages per run; "
      f"password hash: {sys.argv[3]} on both sides")
for row in [header] + rows:
    print("  ".join(value.ljust(width) for value, width in zip(row, widths)).rstrip())
EOF
