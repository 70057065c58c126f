#!/bin/sh
# A throwaway Dovecot POP3 server for benchmarking: serves the maildir of
# bench@bench.test on 127.0.0.1:PORT (plain POP3 with STLS on the same port).
#
#   benchmarks/dovecot_pop3.sh start [PORT]   # default 1110; prints the master PID
#   benchmarks/dovecot_pop3.sh pids [PORT]    # the master PID (give it to --server-pid)
#   benchmarks/dovecot_pop3.sh dir [PORT]     # the instance's temp folder
#   benchmarks/dovecot_pop3.sh stop [PORT]    # stop it and remove the temp folder
#
# The maildir is DIR/mail/bench.test/bench/{tmp,new,cur}, owned by the mail
# user (nobody:nogroup); pop3_retrieve.py --populate gives the files it writes
# the owner of that folder. The user is bench@bench.test with the password
# bench-password (BENCH_USER / BENCH_PASSWORD to change them).
#
# Environment: DOVECOT (/usr/sbin/dovecot), BENCH_USER, BENCH_PASSWORD,
# BENCH_MAIL_USER and BENCH_MAIL_GROUP (owner of the maildir and of the mail
# processes, default nobody / nogroup).
#
# Everything (dovecot.conf, base_dir, state_dir, log, certificate, users
# file, maildir) lives in one temp folder, found again through
# /tmp/mailplat-bench-dovecot-PORT.dir. /etc/dovecot is never read: the
# instance is started with `dovecot -c DIR/dovecot.conf`, has its own base_dir
# (hence its own master.pid and sockets, away from /run/dovecot) and listens
# on one loopback port only (IMAP and POP3S listeners are off). Must run as
# root (Dovecot's master drops to its service users itself).
#
# Dovecot's defaults are kept where they matter for the benchmark: one
# pop3-login process per connection (it terminates TLS and proxies to the
# pop3 process), mail_fsync = optimized, retrieved mail moves to cur/ with the
# S flag. ssl = yes (self-signed, 2 days) with disable_plaintext_auth = no,
# so a client may log in with or without STLS.
set -eu
. "$(dirname "$0")/_lib.sh"

DOVECOT=${DOVECOT:-/usr/sbin/dovecot}
BENCH_USER=${BENCH_USER:-bench@bench.test}
BENCH_PASSWORD=${BENCH_PASSWORD:-bench-password}
MAIL_USER=${BENCH_MAIL_USER:-nobody}
MAIL_GROUP=${BENCH_MAIL_GROUP:-nogroup}

usage() { echo "usage: $0 start|pids|dir|stop [PORT]" >&2; exit 2; }

cmd=${1:-start}
port=${2:-1110}
case $port in
    ''|*[!0-9]*) usage ;;
esac
server_name=Dovecot
statefile=/tmp/mailplat-bench-dovecot-$port.dir

master_pid() {
    tr -d ' \n' < "$1/run/master.pid"
}

start_failed() {
    echo "$1" >&2
    cat "$dir/start.log" >&2 2>/dev/null || true
    [ -f "$dir/dovecot.log" ] && tail -n 20 "$dir/dovecot.log" >&2
    do_stop
    exit 1
}

do_start() {
    if [ -f "$statefile" ]; then
        echo "an instance is already registered for port $port: $(cat "$statefile")" >&2
        echo "run: $0 stop $port" >&2
        exit 1
    fi
    if [ "$(id -u)" != 0 ]; then
        echo "Dovecot's master must be started as root" >&2
        exit 1
    fi
    if [ ! -x "$DOVECOT" ] || [ ! -e /usr/lib/dovecot/pop3 ]; then
        echo "Dovecot's POP3 server is not installed: apt-get install -y dovecot-pop3d" >&2
        exit 1
    fi
    local_part=${BENCH_USER%@*}
    domain=${BENCH_USER#*@}
    dir=$(mktemp -d /tmp/mailplat-bench-dovecot.XXXXXX)
    chmod 755 "$dir"
    echo "$dir" > "$statefile"
    mkdir -p "$dir/run" "$dir/state" "$dir/tls" "$dir/home" \
        "$dir/mail/$domain/$local_part/tmp" "$dir/mail/$domain/$local_part/new" \
        "$dir/mail/$domain/$local_part/cur"
    chown -R "$MAIL_USER:$MAIL_GROUP" "$dir/mail" "$dir/home"

    if ! openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=$domain" \
            -keyout "$dir/tls/key.pem" -out "$dir/tls/cert.pem" >"$dir/start.log" 2>&1; then
        start_failed "openssl could not make a self-signed certificate"
    fi
    chmod 600 "$dir/tls/key.pem"
    printf '%s:{PLAIN}%s\n' "$BENCH_USER" "$BENCH_PASSWORD" > "$dir/users"
    # read by the auth process, which runs as default_internal_user
    chgrp dovecot "$dir/users"
    chmod 640 "$dir/users"

    # Start from nothing, so no setting leaks in from /etc/dovecot.
    cat > "$dir/dovecot.conf" <<EOF
base_dir = $dir/run
state_dir = $dir/state
log_path = $dir/dovecot.log
instance_name = mailplat-bench-dovecot-$port
protocols = pop3
listen = 127.0.0.1
ssl = yes
ssl_cert = <$dir/tls/cert.pem
ssl_key = <$dir/tls/key.pem
disable_plaintext_auth = no
auth_mechanisms = plain
mail_location = maildir:$dir/mail/%d/%n
mail_uid = $MAIL_USER
mail_gid = $MAIL_GROUP
default_internal_user = dovecot
default_login_user = dovenull
pop3_uidl_format = %g
service pop3-login {
  inet_listener pop3 {
    address = 127.0.0.1
    port = $port
  }
  inet_listener pop3s {
    port = 0
  }
}
service imap-login {
  inet_listener imap {
    port = 0
  }
  inet_listener imaps {
    port = 0
  }
}
passdb {
  driver = passwd-file
  args = scheme=PLAIN $dir/users
}
userdb {
  driver = static
  args = uid=$MAIL_USER gid=$MAIL_GROUP home=$dir/home/%d/%n
}
EOF

    if ! "$DOVECOT" -c "$dir/dovecot.conf" >>"$dir/start.log" 2>&1; then
        start_failed "dovecot did not start"
    fi
    if ! wait_for "[ -s '$dir/run/master.pid' ] && banner_is $port +OK" 100; then
        start_failed "Dovecot did not start listening on 127.0.0.1:$port"
    fi
    echo "dovecot instance in $dir listening on 127.0.0.1:$port (POP3, STLS)" >&2
    echo "maildir: $dir/mail/$domain/$local_part" >&2
    master_pid "$dir"
    echo
}

do_stop() {
    dir=$(instance_dir) || exit 1
    if [ -s "$dir/run/master.pid" ]; then
        pid=$(master_pid "$dir")
        # SIGTERM to the master stops it and all its children (`doveadm stop`
        # does the same, but needs a doveadm that reads our config).
        kill "$pid" 2>/dev/null || true
        if ! wait_for "! kill -0 $pid 2>/dev/null" 100; then
            echo "master $pid still running after 10 s; sending SIGKILL" >&2
            kill -9 "$pid" 2>/dev/null || true
        fi
    fi
    case $dir in
        /tmp/mailplat-bench-dovecot.*) rm -rf "$dir" ;;
        *) echo "refusing to remove unexpected folder $dir" >&2 ;;
    esac
    rm -f "$statefile"
    echo "stopped; removed $dir" >&2
}

case $cmd in
    start) do_start ;;
    stop) do_stop ;;
    pids) master_pid "$(instance_dir)"; echo ;;
    dir) instance_dir ;;
    *) usage ;;
esac
