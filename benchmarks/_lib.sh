# Shell functions the benchmark scripts share; sourced, not run.

# The folder of the instance started on $port (recorded in $statefile).
instance_dir() {
    if [ ! -f "$statefile" ]; then
        echo "no benchmark $server_name instance on port $port ($statefile missing)" >&2
        return 1
    fi
    cat "$statefile"
}

# Poll (up to ~$2 tenths of a second) until command $1 succeeds.
wait_for() {
    n=0
    while ! eval "$1"; do
        n=$((n + 1))
        if [ "$n" -ge "$2" ]; then return 1; fi
        sleep 0.1
    done
}

# Does 127.0.0.1:$1 answer with a greeting starting with $2 ("220", "+OK")?
banner_is() {
    python3 - "$1" "$2" <<'PY' 2>/dev/null
import socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=1)
banner = s.recv(512)
s.close()
sys.exit(0 if banner.startswith(sys.argv[2].encode()) else 1)
PY
}

# Postfix's master.cf services, less the listener: only what a throwaway
# instance needs, nothing chrooted (a fresh queue folder has none of the
# files a chroot would need).
postfix_services() {
    cat <<'CF'
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
virtual   unix  -       n       n       -       -       virtual
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
CF
}
