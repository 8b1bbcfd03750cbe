#!/usr/bin/env bash
# A CA and a SuperLink TLS certificate for a Flower federation (flwr 1.41).
#
#   examples/flower-tls/make_certs.sh CERT_DIR [SUPERLINK_HOST [SUPERLINK_IP]]
#
# Writes CERT_DIR/ca.crt (copy it to every SuperNode and to the machine you submit from),
# CERT_DIR/server.pem and CERT_DIR/server.key (the SuperLink's; keep them there) and
# CERT_DIR/ca.key (keep it offline). The certificate names localhost and 127.0.0.1 (the
# SuperLink's own flower-superexec dials 127.0.0.1) plus SUPERLINK_HOST / SUPERLINK_IP,
# the name and address SuperNodes and `rankfed flower run --superlink` dial.
set -euo pipefail
dir=${1:?usage: make_certs.sh CERT_DIR [SUPERLINK_HOST [SUPERLINK_IP]]}
host=${2:-localhost}
ip=${3:-127.0.0.1}
mkdir -p "$dir"
alt="DNS.1 = localhost
IP.1 = 127.0.0.1
IP.2 = ::1"
[ "$host" != localhost ] && alt="$alt
DNS.2 = $host"
[ "$ip" != 127.0.0.1 ] && alt="$alt
IP.3 = $ip"
cat > "$dir/certificate.conf" <<CONF
[req]
default_bits = 4096
prompt = no
default_md = sha256
req_extensions = req_ext
distinguished_name = dn
[dn]
O = rankfed
CN = $host
[req_ext]
subjectAltName = @alt_names
[alt_names]
$alt
CONF
openssl genrsa -out "$dir/ca.key" 4096 2>/dev/null
openssl req -new -x509 -key "$dir/ca.key" -sha256 -subj "/O=rankfed/CN=rankfed federation CA" -days 365 -out "$dir/ca.crt"
openssl genrsa -out "$dir/server.key" 4096 2>/dev/null
openssl req -new -key "$dir/server.key" -out "$dir/server.csr" -config "$dir/certificate.conf"
openssl x509 -req -in "$dir/server.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" -CAcreateserial \
  -out "$dir/server.pem" -days 365 -sha256 -extfile "$dir/certificate.conf" -extensions req_ext 2>/dev/null
openssl verify -CAfile "$dir/ca.crt" "$dir/server.pem"
