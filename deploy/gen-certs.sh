#!/usr/bin/env bash
# gen-certs.sh -- make the private CA and the certificates vmproxy's TLS links
# use: the broker's server certificate and the client certificates of
# vmproxyd and of the consumer (their CN is the RabbitMQ user name that
# EXTERNAL authentication logs in as).
set -euo pipefail

usage() {
	cat <<'EOF'
usage: gen-certs.sh [--force] [--days N] DIR

Creates in DIR (made if missing):
  ca.pem, ca-key.pem              private certificate authority
  server.pem, server-key.pem      broker certificate (serverAuth), SANs
                                  DNS:localhost and IP:127.0.0.1
  proxy.pem, proxy-key.pem        client certificate, CN=vmproxyd (clientAuth)
  consumer.pem, consumer-key.pem  client certificate, CN=vmproxy-consumer

Files already present are kept (a certificate is only re-issued when its key
or certificate is missing, or when the CA was re-made); --force re-creates
everything. Keys are mode 0600, certificates 0644. --days sets the validity
(default 825).
EOF
}

force=0
days=825
dir=
while [ $# -gt 0 ]; do
	case $1 in
	-h | --help) usage; exit 0 ;;
	-f | --force) force=1 ;;
	--days) shift; days=${1:?--days needs a value} ;;
	--days=*) days=${1#--days=} ;;
	-*) echo "gen-certs.sh: unknown option '$1'" >&2; usage >&2; exit 2 ;;
	*)
		[ -z "$dir" ] || { echo "gen-certs.sh: only one DIR" >&2; exit 2; }
		dir=$1
		;;
	esac
	shift
done
[ -n "$dir" ] || { usage >&2; exit 2; }
case $days in '' | *[!0-9]*) echo "gen-certs.sh: --days must be a number" >&2; exit 2 ;; esac

command -v openssl >/dev/null || { echo "gen-certs.sh: openssl not found" >&2; exit 1; }
mkdir -p "$dir"
umask 077
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

made=()
ca_new=0

have() { [ -s "$dir/$1.pem" ] && [ -s "$dir/$1-key.pem" ]; }

newkey() { # newkey NAME
	openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 \
		-out "$tmp/$1-key.pem" 2>/dev/null
}

install_pair() { # install_pair NAME
	install -m 0600 "$tmp/$1-key.pem" "$dir/$1-key.pem"
	install -m 0644 "$tmp/$1.pem" "$dir/$1.pem"
	made+=("$dir/$1.pem" "$dir/$1-key.pem")
}

if [ "$force" = 1 ] || ! have ca; then
	newkey ca
	cat >"$tmp/ca.cnf" <<'EOF'
[req]
distinguished_name = dn
prompt = no
[dn]
O = vmproxy
CN = vmproxy test CA
[ext]
basicConstraints = critical, CA:true, pathlen:0
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
EOF
	openssl req -new -x509 -config "$tmp/ca.cnf" -extensions ext -key "$tmp/ca-key.pem" \
		-days "$days" -sha256 -out "$tmp/ca.pem"
	install_pair ca
	ca_new=1
fi

issue() { # issue NAME CN EKU [SAN]
	local name=$1 cn=$2 eku=$3 san=${4:-}
	if [ "$force" = 0 ] && [ "$ca_new" = 0 ] && have "$name"; then
		return
	fi
	newkey "$name"
	{
		printf '[req]\ndistinguished_name = dn\nprompt = no\n'
		printf '[dn]\nO = vmproxy\nCN = %s\n' "$cn"
		printf '[ext]\nbasicConstraints = critical, CA:false\n'
		printf 'keyUsage = critical, digitalSignature, keyEncipherment\n'
		printf 'extendedKeyUsage = %s\n' "$eku"
		printf 'subjectKeyIdentifier = hash\nauthorityKeyIdentifier = keyid\n'
		[ -z "$san" ] || printf 'subjectAltName = %s\n' "$san"
	} >"$tmp/$name.cnf"
	openssl req -new -config "$tmp/$name.cnf" -key "$tmp/$name-key.pem" -out "$tmp/$name.csr"
	openssl x509 -req -in "$tmp/$name.csr" -CA "$dir/ca.pem" -CAkey "$dir/ca-key.pem" \
		-set_serial "0x$(openssl rand -hex 16)" -days "$days" -sha256 \
		-extfile "$tmp/$name.cnf" -extensions ext -out "$tmp/$name.pem" 2>/dev/null
	install_pair "$name"
}

issue server localhost serverAuth "DNS:localhost, IP:127.0.0.1"
issue proxy vmproxyd clientAuth
issue consumer vmproxy-consumer clientAuth

if [ ${#made[@]} -eq 0 ]; then
	echo "gen-certs.sh: $dir already complete, nothing made (--force to re-create)"
else
	echo "gen-certs.sh: made in $dir:"
	printf '  %s\n' "${made[@]}"
fi
