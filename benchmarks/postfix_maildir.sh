#!/bin/sh
# A throwaway Postfix instance for benchmarking: accepts mail for bench.test on
# 127.0.0.1:PORT and delivers every recipient into one Maildir.
#
#   benchmarks/postfix_maildir.sh start [PORT]   # default 2525; prints the master PID
#   benchmarks/postfix_maildir.sh pids [PORT]    # the master PID (give it to --server-pid)
#   benchmarks/postfix_maildir.sh dir [PORT]     # the instance's temp folder
#   benchmarks/postfix_maildir.sh count [PORT]   # messages delivered so far (files in new/)
#   benchmarks/postfix_maildir.sh stop [PORT]    # stop it and remove the temp folder
#
# Environment: IN_FLOW_DELAY (default 1s, Postfix's own default; 0 disables
# smtpd's back-pressure pause), BENCH_DOMAIN (bench.test), BENCH_MAIL_UID and
# BENCH_MAIL_GID (owner of delivered files, default 65534 = nobody).
#
# Everything (main.cf, master.cf, queue, data, Maildir, log) lives in one temp
# folder, found again through /tmp/mailplat-bench-postfix-PORT.dir. The
# system-wide Postfix (/etc/postfix, /var/spool/postfix) is never touched:
# the instance is started with `postfix -c DIR`, has its own queue_directory
# (hence its own master.pid lock) and data_directory, and listens on one
# loopback port only. Must run as root (Postfix's master insists on it).
#
# The instance keeps Postfix's durability defaults: cleanup fsyncs the queue
# file before smtpd answers 250, and the virtual(8) agent writes Maildir
# files through tmp/ -> new/. Delivery is asynchronous (queue manager), so
# "count" may lag the number of 250s for a moment after a run.
set -eu
. "$(dirname "$0")/_lib.sh"

POSTFIX=${POSTFIX:-/usr/sbin/postfix}
POSTCONF=${POSTCONF:-/usr/sbin/postconf}
DOMAIN=${BENCH_DOMAIN:-bench.test}
# Owner of the delivered files; virtual(8) refuses uids below 100.
MAIL_UID=${BENCH_MAIL_UID:-65534}
MAIL_GID=${BENCH_MAIL_GID:-65534}
# Postfix's default is 1s: smtpd pauses up to this long before taking a new
# message while the queue manager falls behind (back-pressure). That shows up
# as ~1 s latency outliers under load; IN_FLOW_DELAY=0 turns it off.
IN_FLOW_DELAY=${IN_FLOW_DELAY:-1s}

cmd=${1:-start}
port=${2:-2525}
case $port in
    ''|*[!0-9]*) echo "usage: $0 start|stop|pids|dir|count [PORT]" >&2; exit 2 ;;
esac
server_name=Postfix
statefile=/tmp/mailplat-bench-postfix-$port.dir

master_pid() {
    # master.pid holds the PID right-aligned in 10 characters.
    tr -d ' \n' < "$1/queue/pid/master.pid"
}

start_failed() {
    echo "$1" >&2
    cat "$dir/start.log" >&2
    [ -f "$dir/maillog" ] && tail -n 20 "$dir/maillog" >&2
    if command -v script >/dev/null; then
        # rerun the check on a pseudo-terminal to get postfix's own message
        script -qc "$POSTFIX -c $dir/etc check" /dev/null >&2 || true
    fi
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
        echo "Postfix's master must be started as root" >&2
        exit 1
    fi
    dir=$(mktemp -d /tmp/mailplat-bench-postfix.XXXXXX)
    chmod 755 "$dir"
    echo "$dir" > "$statefile"
    mkdir -p "$dir/etc" "$dir/queue" "$dir/data" "$dir/mail/$DOMAIN/bench"
    chown postfix "$dir/data"
    chown -R "$MAIL_UID:$MAIL_GID" "$dir/mail"

    # main.cf: start from nothing, so no setting leaks in from /etc/postfix.
    cat > "$dir/etc/main.cf" <<EOF
compatibility_level = 3.6
queue_directory = $dir/queue
data_directory = $dir/data
mail_owner = postfix
setgid_group = postdrop
myhostname = $DOMAIN
mydomain = $DOMAIN
myorigin = $DOMAIN
mydestination =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
# an MX: mail for $DOMAIN only, never relay, not even for loopback clients
smtpd_relay_restrictions = reject_unauth_destination
relayhost =
alias_maps =
alias_database =
local_recipient_maps =
biff = no
smtpd_banner = \$myhostname ESMTP benchmark
maillog_file = $dir/maillog
maillog_file_prefixes = $dir
# mail for $DOMAIN: every recipient goes to one Maildir (trailing / = Maildir)
virtual_mailbox_domains = $DOMAIN
virtual_mailbox_base = $dir/mail
virtual_mailbox_maps = static:$DOMAIN/bench/
virtual_uid_maps = static:$MAIL_UID
virtual_gid_maps = static:$MAIL_GID
virtual_mailbox_limit = 0
message_size_limit = 52428800
# all clients are local: no per-client limits in the way of the benchmark
smtpd_client_event_limit_exceptions = 127.0.0.0/8
in_flow_delay = $IN_FLOW_DELAY
EOF

    { echo "127.0.0.1:$port inet n  -       n       -       -       smtpd"; postfix_services; } > "$dir/etc/master.cf"

    # The postfix command prints its fatal errors only when stderr is a
    # terminal (otherwise only to the log), so check first and show why.
    if ! "$POSTFIX" -c "$dir/etc" check >"$dir/start.log" 2>&1; then
        start_failed "postfix check failed"
    fi
    # `postfix start` creates the queue subfolders (post-install create-missing).
    if ! "$POSTFIX" -c "$dir/etc" start >>"$dir/start.log" 2>&1; then
        start_failed "postfix start failed"
    fi
    if ! wait_for "[ -s '$dir/queue/pid/master.pid' ] && banner_is $port 220" 100; then
        start_failed "Postfix did not start listening on 127.0.0.1:$port"
    fi
    echo "postfix instance in $dir listening on 127.0.0.1:$port" >&2
    echo "maildir: $dir/mail/$DOMAIN/bench/new" >&2
    master_pid "$dir"
    echo
}

do_stop() {
    dir=$(instance_dir) || exit 1
    if [ -s "$dir/queue/pid/master.pid" ]; then
        pid=$(master_pid "$dir")
        "$POSTFIX" -c "$dir/etc" stop >/dev/null 2>&1 || true
        # `postfix stop` signals the master; poll until it and its children exit.
        if ! wait_for "! kill -0 $pid 2>/dev/null" 100; then
            echo "master $pid still running after 10 s; sending SIGKILL" >&2
            "$POSTFIX" -c "$dir/etc" abort >/dev/null 2>&1 || kill -9 "$pid" 2>/dev/null || true
        fi
    fi
    case $dir in
        /tmp/mailplat-bench-postfix.*) rm -rf "$dir" ;;
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
    count)
        dir=$(instance_dir)
        new="$dir/mail/$DOMAIN/bench/new"
        if [ -d "$new" ]; then find "$new" -type f | wc -l; else echo 0; fi ;;
    *) echo "usage: $0 start|stop|pids|dir|count [PORT]" >&2; exit 2 ;;
esac
