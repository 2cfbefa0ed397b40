#!/usr/bin/env bash
# Create a private CA and the certificates remote-mvc needs for two-way TLS (`make certs`).
#
#   ops/tls/make-certs.sh [OUTDIR] [EXTRA_SAN ...]        (OUTDIR defaults to certs/, git-ignored)
#
# OUTDIR/ca.crt, ca.key          the private CA (keep ca.key off the servers)
# OUTDIR/<name>.crt, <name>.key  one per service (nameserver, model, ticker, viewer, gateway) with the
#                                service name, localhost and 127.0.0.1 as subject alternative names,
#                                and one per identity (controller, admin): the common name is the
#                                identity a server grants to a client presenting the certificate.
# Every certificate can serve and connect (serverAuth + clientAuth): viewers are servers too.
# Existing files are kept; delete OUTDIR to start over. Keys are group-readable by gid 10001, the
# containers' `mvc` group, when run as root, so the Compose stack can mount them read-only.
set -euo pipefail
out="${1:-certs}"
shift || true
extra=("$@")
days="${CERT_DAYS:-825}"
mkdir -p "$out"
umask 027

if [ ! -s "$out/ca.crt" ]; then
    openssl req -x509 -newkey rsa:2048 -nodes -sha256 -days 3650 -subj "/CN=remote-mvc private CA" \
        -keyout "$out/ca.key" -out "$out/ca.crt" 2>/dev/null
    echo "created $out/ca.crt"
fi

issue() {
    local name="$1"
    [ -s "$out/$name.crt" ] && return 0
    local san="DNS:$name,DNS:localhost,IP:127.0.0.1"
    for e in "${extra[@]}"; do
        if [[ "$e" =~ ^[0-9.]+$ ]]; then san="$san,IP:$e"; else san="$san,DNS:$e"; fi
    done
    local ext
    ext="$(mktemp)"
    printf 'subjectAltName=%s\nextendedKeyUsage=serverAuth,clientAuth\nkeyUsage=digitalSignature,keyEncipherment\nbasicConstraints=CA:FALSE\n' "$san" > "$ext"
    openssl req -newkey rsa:2048 -nodes -sha256 -subj "/CN=$name" -keyout "$out/$name.key" \
        -out "$out/$name.csr" 2>/dev/null
    openssl x509 -req -sha256 -days "$days" -in "$out/$name.csr" -CA "$out/ca.crt" -CAkey "$out/ca.key" \
        -CAcreateserial -extfile "$ext" -out "$out/$name.crt" 2>/dev/null
    rm -f "$out/$name.csr" "$ext"
    echo "created $out/$name.crt"
}

for name in nameserver model ticker viewer gateway controller admin; do
    issue "$name"
done
chmod 644 "$out"/*.crt
chmod 640 "$out"/*.key
chmod 600 "$out/ca.key"
if [ "$(id -u)" -eq 0 ]; then
    chgrp 10001 "$out"/*.key
    chgrp 0 "$out/ca.key"
fi
