#!/usr/bin/env bash
# Proves that adding a device is dropping one file into hw/<category>/: copies the
# README's example device, hw/misc/scratch.rs, under a new type name, rebuilds, and checks
# that `-device help` lists the new type with no other edit. The copy is removed on every
# exit path.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC2034 # read by scripts/lib/debian.sh
QOMVM_PROG=drop-in
# shellcheck source=scripts/lib/debian.sh disable=SC1091
. scripts/lib/debian.sh
qomvm_need_cargo .

copy=hw/misc/drop-in-check.rs
trap 'rm -f "$copy"' EXIT
sed 's/"scratch"/"drop-in-check"/' hw/misc/scratch.rs >"$copy"
cargo build --quiet --bin qomvm
if ./target/debug/qomvm -device help | grep -q '^name "drop-in-check", bus ISA, desc "a scratch register"$'; then
    echo "drop-in: OK (hw/misc/drop-in-check.rs appeared in -device help with no other edit)"
else
    echo "drop-in: FAILED: the copied device file did not register 'drop-in-check'" >&2
    exit 1
fi
