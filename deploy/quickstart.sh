#!/usr/bin/env bash
# quickstart.sh -- the whole system on one machine: a private RabbitMQ with
# TLS and client-certificate auth, vmproxyd, N simulated guest VMs running
# vmproxy-agent (each from its own loopback address), and vmproxy-consumer.
# Prints a live table until Ctrl-C (or q), or runs --duration SECONDS and
# exits 0 only if every VM's metrics reached the consumer. On a terminal the
# table is redrawn in place; piped, it prints one table after another.
# Stops only what it started. Run as root on Debian 12 from a checkout.
set -uo pipefail

top=$(cd "$(dirname "$0")/.." && pwd)
vms=20
duration=0
dir=/tmp/vmproxy-quickstart
interval=2

usage() {
	echo "Usage: $0 [--vms N] [--duration SECONDS] [--dir DIR] [--interval SECONDS]"
}
while [ $# -gt 0 ]; do
	case "$1" in
	--vms) vms=$2; shift 2 ;;
	--duration) duration=$2; shift 2 ;;
	--dir) dir=$2; shift 2 ;;
	--interval) interval=$2; shift 2 ;;
	-h|--help) usage; exit 0 ;;
	*) usage >&2; exit 2 ;;
	esac
done
case "$vms" in ''|*[!0-9]*) echo "--vms: a number" >&2; exit 2 ;; esac
[ "$vms" -ge 1 ] && [ "$vms" -le 250 ] || { echo "--vms: 1 to 250" >&2; exit 2; }

pids=()
cleanup() {
	trap - INT TERM EXIT
	for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
		kill -TERM "${pids[$i]}" 2>/dev/null
	done
	for p in "${pids[@]}"; do
		for _ in $(seq 1 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
		kill -KILL "$p" 2>/dev/null
	done
}
trap 'cleanup; exit 130' INT TERM
trap cleanup EXIT

say() { printf '%s\n' "quickstart: $*"; }

# On a terminal the table is redrawn over the previous one (cursor up, clear
# to the end of the screen); each line is cut to the terminal's width, since
# a wrapped line would make the next redraw miscount.
live=0
[ -t 1 ] && live=1
shown=0
show() { # show TEXT
	if [ "$live" -eq 0 ]; then
		printf '%s\n' "$1"
		return
	fi
	local cols
	cols=$(stty size </dev/tty 2>/dev/null | cut -d' ' -f2)
	[ -n "$cols" ] && [ "$cols" -gt 0 ] || cols=80
	[ "$shown" -gt 0 ] && printf '\033[%dA' "$shown"
	printf '\033[J'
	printf '%s\n' "$1" | cut -c "1-$cols"
	shown=$(printf '%s\n' "$1" | wc -l)
}

# Five seconds between tables; on a terminal, q ends the run. While read
# waits, INT and TERM only set a flag: bash 5.2 aborts ("longjmp causes
# uninitialized stack frame") when a trap exits from inside read -t.
pause() {
	local end=$((SECONDS + 5)) key stop=0
	if [ "$live" -eq 0 ] || [ ! -t 0 ]; then
		sleep 5
		return 0
	fi
	trap 'stop=130' INT TERM
	while [ "$stop" -eq 0 ] && [ "$SECONDS" -lt "$end" ]; do
		if read -rsn1 -t "$((end - SECONDS))" key && [ "$key" = q ]; then
			stop=1
		fi
	done
	trap 'cleanup; exit 130' INT TERM
	case $stop in
	130) cleanup; exit 130 ;;
	1) return 1 ;;
	esac
	return 0
}

bash "$top/deploy/install-deps.sh" >/dev/null || { say "dependency install failed"; exit 1; }
say "building into $top/build-quickstart"
if [ ! -d "$top/build-quickstart" ]; then
	meson setup "$top/build-quickstart" "$top" --buildtype=release >/dev/null || exit 1
fi
ninja -C "$top/build-quickstart" >/dev/null || { say "build failed"; exit 1; }
bin=$top/build-quickstart

rm -rf "$dir"
mkdir -p "$dir"/{spool,consumer,log}
chmod 755 "$dir" # the broker runs as user rabbitmq and must reach its files
bash "$top/deploy/gen-certs.sh" "$dir/certs" >/dev/null || exit 1

say "starting RabbitMQ (TLS, client certificates)"
( cd "$top/tests/integration" && exec /usr/bin/python3 -m harness.rabbitmq \
	--workdir "$dir/broker" --certs "$dir/certs" ) >"$dir/broker.json" 2>"$dir/log/broker.log" &
pids+=($!)
for _ in $(seq 1 120); do [ -s "$dir/broker.json" ] && break; sleep 0.5; done
[ -s "$dir/broker.json" ] || { say "the broker did not start: $(tail -5 "$dir/log/broker.log")"; exit 1; }
tls_port=$(/usr/bin/python3 -c "import json,sys;print(json.load(open(sys.argv[1]))['tls_port'])" "$dir/broker.json")
nodename=$(/usr/bin/python3 -c "import json,sys;print(json.load(open(sys.argv[1]))['nodename'])" "$dir/broker.json")

free_port() {
	/usr/bin/python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'
}
proxy_port=$(free_port)
proxy_metrics=$(free_port)
consumer_metrics=$(free_port)

# The VMs: a libvirt test-driver node file (names, uuids, vsock CIDs) and
# the proxy's static table mapping each VM's loopback address to it.
/usr/bin/python3 - "$dir" "$vms" "$proxy_port" "$tls_port" "$proxy_metrics" \
	"$consumer_metrics" <<'PY'
import json, sys, uuid
d, n, pport, tport, pmet, cmet = sys.argv[1], int(sys.argv[2]), *map(int, sys.argv[3:])
doms, statics = [], []
for i in range(n):
    name = "guest-%02d" % (i + 1)
    u = str(uuid.uuid5(uuid.NAMESPACE_DNS, name + ".quickstart.vmproxy"))
    doms.append('  <domain type="test"><name>%s</name><uuid>%s</uuid><memory>131072</memory>'
                '<vcpu>1</vcpu><os><type>hvm</type></os><devices><vsock model="virtio">'
                '<cid auto="no" address="%d"/></vsock></devices></domain>' % (name, u, 100 + i))
    statics.append({"address": "127.20.0.%d" % (i + 1), "vm": name})
open(d + "/node.xml", "w").write("<node>\n" + "\n".join(doms) + "\n</node>\n")
c = d + "/certs/"
json.dump({
    "listeners": [{"type": "tcp", "address": "127.0.0.1", "port": pport}],
    "identity": {"libvirt_uri": "test://" + d + "/node.xml", "static": statics},
    "upstream": {"host": "localhost", "port": tport, "vhost": "vmproxy", "exchange": "vm.metrics",
                 "tls": {"ca": c + "ca.pem", "cert": c + "proxy.pem", "key": c + "proxy-key.pem"},
                 "auth": {"mechanism": "EXTERNAL"}},
    "guest": {"allowed_exchanges": ["metrics"]},
    "admin": {"socket": d + "/admin.sock"},
    "metrics": {"listen": "127.0.0.1:%d" % pmet, "per_vm": True},
    "hostname": "quickstart-host"}, open(d + "/vmproxyd.json", "w"), indent=2)
json.dump({
    "broker": {"host": "localhost", "port": tport, "vhost": "vmproxy",
               "tls": {"ca": c + "ca.pem", "cert": c + "consumer.pem", "key": c + "consumer-key.pem"},
               "auth": {"mechanism": "EXTERNAL"}},
    "queue": {"name": "vm.metrics.quickstart", "type": "quorum", "exchange": "vm.metrics",
              "binding_key": "#"},
    "sink": {"type": "sqlite", "dir": d + "/consumer", "path": d + "/consumer/metrics.db"},
    "metrics": {"listen": "127.0.0.1:%d" % cmet, "stale_after_intervals": 3}},
    open(d + "/consumer.json", "w"), indent=2)
PY

say "starting vmproxyd"
"$bin/proxy/vmproxyd" --config "$dir/vmproxyd.json" 2>"$dir/log/vmproxyd.log" &
pids+=($!)
say "starting vmproxy-consumer"
"$bin/mgmt-consumer/vmproxy-consumer" --config "$dir/consumer.json" 2>"$dir/log/consumer.log" &
pids+=($!)
for _ in $(seq 1 60); do grep -q "consuming" "$dir/log/consumer.log" && break; sleep 0.5; done
say "starting $vms agents"
for i in $(seq 1 "$vms"); do
	"$bin/guest-agent/vmproxy-agent" --endpoint "tcp://127.0.0.1:$proxy_port" \
		--source-address "127.20.0.$i" --interval "$interval" \
		--spool-dir "$dir/spool/guest-$i" 2>"$dir/log/agent-$i.log" &
	pids+=($!)
done

ctl="$bin/proxy/vmproxyctl --socket $dir/admin.sock"
cat <<INFO

  vmproxyctl:         $ctl status        (also: threads, vms, vm guest-01)
  proxy metrics:      http://127.0.0.1:$proxy_metrics/metrics
  consumer metrics:   http://127.0.0.1:$consumer_metrics/metrics
  stored samples:     $dir/consumer/metrics.db (SQLite)
  query the store:    $bin/mgmt-consumer/vmproxy-consumer query --config $dir/consumer.json
  logs:               $dir/log/

INFO
[ "$live" -eq 1 ] && say "live table every 5 s; q or Ctrl-C stops everything"

report() {
	local text
	text=$(report_text)
	show "$text"
}

report_text() {
	/usr/bin/python3 - "$dir" "$vms" "$proxy_metrics" "$nodename" <<'PY'
import json, sqlite3, subprocess, sys, time, urllib.request
d, n, pmet, node = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
latest, stored = {}, 0
try:
    db = sqlite3.connect(d + "/consumer/metrics.db", timeout=30)
    stored = db.execute("SELECT count(*) FROM samples").fetchone()[0]
    for name, doc in db.execute(
            "SELECT v.name, (SELECT s.doc FROM samples s WHERE s.vm_uuid = v.uuid "
            "ORDER BY s.time_ms DESC LIMIT 1) FROM vms v"):
        if doc:
            latest[name] = json.loads(doc)
except sqlite3.Error:
    pass
try:
    text = urllib.request.urlopen("http://127.0.0.1:%s/metrics" % pmet, timeout=3).read().decode()
    msgs = sum(float(x.split()[-1]) for x in text.splitlines()
               if x.startswith("vmproxy_thread_messages_in_total{"))
except Exception:
    msgs = float("nan")
state = d + "/rate.json"
try:
    prev = json.load(open(state))
except Exception:
    prev = None
now = time.time()
rate = (msgs - prev["msgs"]) / (now - prev["t"]) if prev and msgs == msgs else 0.0
json.dump({"msgs": msgs, "t": now}, open(state, "w"))
print("%s  VMs reporting %d/%d   proxy %.1f msgs/s   stored samples %d" % (
    time.strftime("%H:%M:%S"), len(latest), n, rate, stored))
for name in sorted(latest)[:5]:
    doc = latest[name]
    print("  %-10s seq %-5d cpu %5.1f%%  mem %5.1f%%  load %.2f" % (
        name, doc["seq"], doc.get("cpu", {}).get("busy_pct", 0),
        doc.get("memory", {}).get("used_pct", 0), doc.get("load", {}).get("load1", 0)))
PY
	# Client-side sockets to the broker's TLS port: the broker's connections.
	printf '  broker connections: %s (vmproxyd links + the consumer)\n' \
		"$(ss -Htn state established "( dport = :$tls_port )" | wc -l)"
}

start=$(date +%s)
while :; do
	if ! pause; then
		say "stopped"
		exit 0
	fi
	report
	for p in "${pids[@]:0:3}"; do
		kill -0 "$p" 2>/dev/null || { say "a service died; see $dir/log"; exit 1; }
	done
	if [ "$duration" -gt 0 ] && [ $(( $(date +%s) - start )) -ge "$duration" ]; then
		missing=$(/usr/bin/python3 - "$dir" "$vms" <<'PY'
import sqlite3, sys
d, n = sys.argv[1], int(sys.argv[2])
db = sqlite3.connect(d + "/consumer/metrics.db", timeout=30)
seen = {r[0] for r in db.execute(
    "SELECT DISTINCT v.name FROM samples s JOIN vms v ON v.uuid = s.vm_uuid")}
print(" ".join(sorted({"guest-%02d" % (i + 1) for i in range(n)} - seen)))
PY
)
		if [ -n "$missing" ]; then
			say "FAILED: no metrics reached the consumer from: $missing"
			exit 1
		fi
		say "OK: all $vms VMs' metrics reached the consumer ($dir/consumer/metrics.db)"
		"$bin/mgmt-consumer/vmproxy-consumer" query --config "$dir/consumer.json" | head -5
		exit 0
	fi
done
