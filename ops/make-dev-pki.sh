#!/usr/bin/env bash
# Makes a development PKI for the broker: a CA, a server certificate for 127.0.0.1 and
# localhost, and client certificates for the names given (the shipped broker config asks every
# client for one). For development and tests only: the CA key sits next to the certificates.
#
#   ops/make-dev-pki.sh [--out DIR] [CLIENT_NAME ...]
#
# DIR defaults to .dev-pki/ in the workspace (git-ignored). Idempotent: a file that exists, is
# signed by the CA in DIR and is valid for at least another day is kept; anything else is
# (re)made, so running it again after adding a client name only makes that client's pair.
# Writes: ca.pem ca-key.pem server.pem server-key.pem client-NAME.pem client-NAME-key.pem
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out="$root/.dev-pki"
clients=()
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out="$2"; shift 2 ;;
    -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
    -*) echo "unknown option $1" >&2; exit 2 ;;
    *) clients+=("$1"); shift ;;
  esac
done
command -v openssl >/dev/null || { echo "openssl is missing: apt-get install openssl" >&2; exit 1; }
for name in "${clients[@]}"; do
  # The name becomes a file name and a certificate CN: keep it to what a tenant name may be.
  [[ "$name" =~ ^[A-Za-z0-9_-]{1,64}$ ]] || { echo "bad client name: $name" >&2; exit 2; }
done

mkdir -p "$out"
chmod 700 "$out"
umask 077
days=825 # the longest validity Apple and browsers accept for leaf certificates

# True when $1 is a certificate signed by our CA and valid for at least one more day.
fresh() {
  [ -s "$1" ] && [ -s "${1%.pem}-key.pem" ] \
    && openssl verify -CAfile "$out/ca.pem" "$1" >/dev/null 2>&1 \
    && openssl x509 -in "$1" -noout -checkend 86400 >/dev/null 2>&1
}

# A P-256 key (PKCS#8, which rustls and Go both read) and a certificate signed by the CA.
issue() { # file-stem subject extensions
  local stem=$1 subject=$2 ext=$3
  openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -keyout "$out/$stem-key.pem" -subj "$subject" -out "$out/$stem.csr" 2>/dev/null
  openssl x509 -req -in "$out/$stem.csr" -CA "$out/ca.pem" -CAkey "$out/ca-key.pem" \
    -CAcreateserial -days "$days" -sha256 -extfile <(printf '%s\n' "$ext") \
    -out "$out/$stem.pem" 2>/dev/null
  rm -f "$out/$stem.csr"
  echo "made $out/$stem.pem"
}

if ! { [ -s "$out/ca.pem" ] && [ -s "$out/ca-key.pem" ] \
  && openssl x509 -in "$out/ca.pem" -noout -checkend 86400 >/dev/null 2>&1; }; then
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 3650 -sha256 \
    -keyout "$out/ca-key.pem" -out "$out/ca.pem" -subj "/CN=Fleet development CA" \
    -addext "basicConstraints=critical,CA:TRUE,pathlen:0" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
  # Everything the old CA signed is now stale and gets re-issued below.
  echo "made $out/ca.pem"
fi

fresh "$out/server.pem" || issue server "/CN=localhost" \
  "basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=serverAuth
subjectAltName=IP:127.0.0.1,DNS:localhost"

for name in "${clients[@]}"; do
  fresh "$out/client-$name.pem" || issue "client-$name" "/CN=$name" \
    "basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=clientAuth"
done
# Certificates are public; keys stay owner-only (umask 077 above).
chmod 644 "$out"/*.pem
chmod 600 "$out"/*-key.pem
