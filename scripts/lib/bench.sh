# shellcheck shell=bash
# What the benchmark scripts (bench-boot.sh, bench-fio.sh, bench-net.sh) share: the qomvm
# binary, the guest assets, and where the guests can run. Sourced after
# scripts/lib/debian.sh (qomvm_log, qomvm_die); the sourcing script sets REPO and
# SCRIPT_DIR.

# Whether /dev/kvm can be opened for reading and writing.
kvm_usable() { [[ -c /dev/kvm && -r /dev/kvm && -w /dev/kvm ]] && : 2>/dev/null <>/dev/kvm; }

# bench_qomvm_binary PATH BUILD: prints the absolute path of the qomvm binary: PATH if
# given, else target/release/qomvm, built with cargo first when BUILD is 1.
# Use as: qomvm_bin=$(bench_qomvm_binary "$qomvm_bin" "$build") || exit 1
bench_qomvm_binary() {
    local bin=$1 build=$2
    if [[ -z $bin ]]; then
        if [[ $build == 1 ]]; then
            qomvm_need_cargo "$REPO"
            qomvm_log "cargo build --release"
            (cd "$REPO" && cargo build --release --quiet --bin qomvm) >&2 ||
                qomvm_die "cargo build --release failed"
        fi
        bin=$REPO/target/release/qomvm
    fi
    [[ -x $bin ]] || qomvm_die "qomvm binary $bin not found or not executable"
    printf '%s/%s\n' "$(cd "$(dirname "$bin")" && pwd)" "$(basename "$bin")"
}

# bench_assets DIR FILE...: prints the absolute path of the guest assets: DIR if given,
# else target/guest-assets, brought up to date with scripts/guest-assets.sh; every FILE
# must be there. Use as: assets=$(bench_assets "$assets" vmlinuz ...) || exit 1
bench_assets() {
    local dir=$1 file
    shift
    if [[ -z $dir ]]; then
        dir=$REPO/target/guest-assets
        "$SCRIPT_DIR/guest-assets.sh" "$dir" >&2 || qomvm_die "scripts/guest-assets.sh failed"
    fi
    for file in "$@"; do
        [[ -s $dir/$file ]] || qomvm_die "no $file in $dir (run scripts/guest-assets.sh DIR)"
    done
    (cd "$dir" && pwd)
}

# bench_rig_reason: prints why the guests must run inside scripts/nested-kvm.sh (a PVM
# /dev/kvm cannot boot a stock kernel; or there is no usable /dev/kvm); fails where they
# run directly (hardware KVM).
bench_rig_reason() {
    if [[ -d /sys/module/kvm_pvm ]]; then
        echo "nested rig under PVM (host /dev/kvm is kvm_pvm)"
    elif ! kvm_usable; then
        echo "nested rig (host has no usable /dev/kvm)"
    else
        return 1
    fi
}
