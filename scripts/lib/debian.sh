# shellcheck shell=bash
# Shared helpers for scripts/guest-assets.sh and scripts/nested-kvm.sh:
# fetch Debian packages with `apt-get download` into a cache, resolve
# metapackages (linux-image-amd64 -> linux-image-6.1.0-NN-amd64) and extract
# files from .debs with dpkg-deb. Nothing here installs a package except
# qomvm_need_cmd, which installs a missing host tool only when running as root.
#
# The sourcing script sets QOMVM_PROG (used as the message prefix) and runs
# under `set -euo pipefail`.

QOMVM_PROG=${QOMVM_PROG:-qomvm}
QOMVM_CACHE=${XDG_CACHE_HOME:-${HOME:-/root}/.cache}/qomvm
QOMVM_DEB_CACHE=$QOMVM_CACHE/debs
_qomvm_apt_updated=0

qomvm_log() { printf '%s: %s\n' "$QOMVM_PROG" "$*" >&2; }
# Exit status of qomvm_die; nested-kvm.sh sets 125 so that its own failures
# cannot be mistaken for COMMAND's status.
QOMVM_DIE_STATUS=${QOMVM_DIE_STATUS:-1}
qomvm_die() { printf '%s: error: %s\n' "$QOMVM_PROG" "$*" >&2; exit "$QOMVM_DIE_STATUS"; }

# Run `apt-get update` at most once per process (root only).
qomvm_apt_update() {
    [[ $_qomvm_apt_updated == 1 ]] && return 0
    _qomvm_apt_updated=1
    if [[ $(id -u) != 0 ]]; then
        qomvm_log "apt package lists look stale or empty; run 'apt-get update' as root"
        return 1
    fi
    qomvm_log "running apt-get update"
    apt-get update -qq >&2 || { qomvm_log "apt-get update failed"; return 1; }
}

# qomvm_need_cmd CMD DEBIAN_PACKAGE: make sure CMD is on PATH. As root a
# missing tool is installed with apt-get (and said so); otherwise it is an error.
qomvm_need_cmd() {
    local cmd=$1 pkg=$2
    command -v "$cmd" >/dev/null 2>&1 && return 0
    if [[ $(id -u) == 0 && -z ${QOMVM_NO_APT_INSTALL:-} ]]; then
        qomvm_log "$cmd not found: installing the Debian package $pkg"
        if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$pkg" >&2; then
            qomvm_apt_update || true
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$pkg" >&2 ||
                qomvm_die "$cmd not found and 'apt-get install $pkg' failed: install the Debian package $pkg"
        fi
        command -v "$cmd" >/dev/null 2>&1 && return 0
    fi
    qomvm_die "$cmd not found: install the Debian package $pkg"
}

# qomvm_extract_vmlinux BZIMAGE OUT: the uncompressed ELF kernel inside a bzImage (its
# payload, which the boot protocol header locates: payload_offset at 0x248 and
# payload_length at 0x24c, from the protected-mode code after the setup sectors), so a VMM
# can enter the kernel without running its decompressor (seconds of guest time under TCG).
# Returns 1, saying why, when there is none.
qomvm_extract_vmlinux() {
    local setup_sects offset length start magic payload ok=0
    setup_sects=$(od -An -tu1 -j $((0x1f1)) -N1 "$1" | tr -d ' ')
    offset=$(od -An -tu4 -j $((0x248)) -N4 "$1" | tr -d ' ')
    length=$(od -An -tu4 -j $((0x24c)) -N4 "$1" | tr -d ' ')
    if ! [[ $setup_sects =~ ^[0-9]+$ && $offset =~ ^[0-9]+$ && $length =~ ^[1-9][0-9]*$ ]]; then
        qomvm_log "$1: no bzImage payload in its header"
        return 1
    fi
    ((setup_sects > 0)) || setup_sects=4
    start=$(((setup_sects + 1) * 512 + offset))
    magic=$(od -An -tx1 -j "$start" -N6 "$1" | tr -d ' ')
    payload=$(mktemp "${TMPDIR:-/tmp}/qomvm-payload.XXXXXX")
    tail -c +$((start + 1)) "$1" | head -c "$length" >"$payload"
    # The payload ends with the uncompressed size (4 bytes), which some tools call
    # trailing garbage: their status is not the test, the ELF header is.
    case $magic in
        1f8b*) gzip -dc <"$payload" >"$2" 2>/dev/null ;;
        fd377a585a00) qomvm_need_cmd xz xz-utils; xz -dc --single-stream <"$payload" >"$2" 2>/dev/null ;;
        5d0000*) qomvm_need_cmd xz xz-utils; xz --format=lzma -dc <"$payload" >"$2" 2>/dev/null ;;
        28b52ffd*) qomvm_need_cmd zstd zstd; zstd -qdc <"$payload" >"$2" 2>/dev/null ;;
        02214c18*) qomvm_need_cmd lz4 lz4; lz4 -qdc <"$payload" >"$2" 2>/dev/null ;;
        425a68*) qomvm_need_cmd bzip2 bzip2; bzip2 -dc <"$payload" >"$2" 2>/dev/null ;;
        *) qomvm_log "$1: payload compressed in an unknown format (magic $magic)" ;;
    esac
    rm -f "$payload"
    [[ -s $2 && $(od -An -tx1 -N4 "$2" | tr -d ' ') == 7f454c46 ]] && ok=1
    if ((!ok)); then
        rm -f "$2"
        qomvm_log "$1: its payload did not decompress to an ELF kernel"
        return 1
    fi
}


# qomvm_need_cargo REPO: make sure cargo is there and at least as new as the
# rust-version of REPO's Cargo.toml (Debian 12's own cargo, 1.63, is too old).
qomvm_need_cargo() {
    local need have
    need=$(sed -n 's/^rust-version = "\(.*\)"$/\1/p' "$1/Cargo.toml" | head -n1)
    command -v cargo >/dev/null 2>&1 ||
        qomvm_die "cargo not found: qomvm needs Rust $need or newer (https://rustup.rs)"
    have=$(cargo --version | awk '{print $2}')
    [[ $(printf '%s\n%s\n' "$need" "${have%%-*}" | sort -V | head -n1) == "$need" ]] ||
        qomvm_die "cargo $have is too old: qomvm needs Rust $need or newer (rustup update, or https://rustup.rs)"
}

# _qomvm_memo KEY CMD...: print CMD's output, remembered under KEY until apt's
# package lists change (apt-cache takes ~0.6 s a call when apt keeps no
# binary cache, which would make a no-op rerun slow).
_qomvm_memo() {
    local key=$1 memo lists=/var/lib/apt/lists
    shift
    memo=$QOMVM_CACHE/apt-memo/$key
    if [[ -s $memo && $memo -nt $lists ]]; then
        cat "$memo"
        return 0
    fi
    local out
    out=$("$@") || return 1
    mkdir -p "${memo%/*}"
    printf '%s\n' "$out" >"$memo.$$" && mv -f "$memo.$$" "$memo"
    printf '%s\n' "$out"
}

# deb_candidate PKG: print "PACKAGE VERSION ARCH" of apt's candidate for PKG.
_deb_candidate_once() {
    apt-cache show --no-all-versions "$1" 2>/dev/null | awk '
        /^Package: / { p = $2 } /^Version: / { v = $2 } /^Architecture: / { a = $2 }
        /^$/ { if (p != "") exit }
        END { if (p == "" || v == "" || a == "") exit 1; print p, v, a }'
}
deb_candidate() {
    _qomvm_memo "cand-$1" _deb_candidate_once "$1" ||
        { qomvm_apt_update && _qomvm_memo "cand-$1" _deb_candidate_once "$1"; }
}

# deb_candidates_prefetch PKG...: fill deb_candidate's memo for many packages
# with one apt-cache call (one call per package costs ~0.6 s each).
deb_candidates_prefetch() {
    local lists=/var/lib/apt/lists dir=$QOMVM_CACHE/apt-memo p todo=()
    for p in "$@"; do
        [[ -s $dir/cand-$p && $dir/cand-$p -nt $lists ]] || todo+=("$p")
    done
    [[ ${#todo[@]} -gt 0 ]] || return 0
    mkdir -p "$dir"
    apt-cache show --no-all-versions "${todo[@]}" 2>/dev/null | awk -v dir="$dir" -v tag=$$ '
        function flush() {
            if (p != "" && v != "" && a != "" && !(p in done)) {
                done[p] = 1; f = dir "/cand-" p "." tag
                print p, v, a >f; close(f); print f
            }
            p = v = a = ""
        }
        /^Package: / { p = $2 } /^Version: / { v = $2 } /^Architecture: / { a = $2 }
        /^$/ { flush() } END { flush() }' |
        while read -r f; do mv -f "$f" "${f%.*}"; done
}

# deb_resolve_meta META REGEX: print the first dependency of apt's candidate for
# metapackage META whose name matches the extended REGEX.
_deb_resolve_meta_once() {
    apt-cache show --no-all-versions "$1" 2>/dev/null |
        sed -n 's/^Depends: //p' | head -n1 | sed 's/[,|]/\n/g' |
        awk -v re="$2" '{ if ($1 ~ re) { print $1; found = 1; exit } } END { exit !found }'
}
deb_resolve_meta() {
    _qomvm_memo "meta-$1" _deb_resolve_meta_once "$1" "$2" ||
        { qomvm_apt_update && _qomvm_memo "meta-$1" _deb_resolve_meta_once "$1" "$2"; }
}

# deb_file_name PKG: the file name `apt-get download` gives apt's candidate
# of PKG (empty when apt has none).
deb_file_name() {
    local cand name ver arch
    cand=$(deb_candidate "$1" 2>/dev/null) || return 0
    read -r name ver arch <<<"$cand"
    printf '%s\n' "${name}_${ver//:/%3a}_${arch}.deb"
}

# deb_file_names PKG...: deb_file_name of each PKG, one per line; fresh memo
# entries are read without forking, so that an up-to-date check of many
# packages stays fast.
deb_file_names() {
    local p memo lists=/var/lib/apt/lists name ver arch
    for p in "$@"; do
        memo=$QOMVM_CACHE/apt-memo/cand-$p
        if [[ -s $memo && $memo -nt $lists ]] && read -r name ver arch <"$memo"; then
            printf '%s\n' "${name}_${ver//:/%3a}_${arch}.deb"
        else
            deb_file_name "$p"
        fi
    done
}

# deb_fetch PKG: download apt's candidate .deb of PKG into the cache unless it
# is already there; print the path of the cached .deb. When apt knows nothing
# about PKG (no lists, no network) the newest cached .deb of PKG is used.
deb_fetch() {
    local pkg=$1 cand name ver arch file tmp
    mkdir -p "$QOMVM_DEB_CACHE"
    if ! cand=$(deb_candidate "$pkg"); then
        file=$(find "$QOMVM_DEB_CACHE" -maxdepth 1 -name "${pkg}_*.deb" -printf '%T@ %p\n' 2>/dev/null |
            sort -n | tail -n1 | cut -d' ' -f2-)
        [[ -n $file ]] || qomvm_die "apt knows no package '$pkg' and none is cached (is this Debian 12 with deb.debian.org in the sources?)"
        qomvm_log "apt has no candidate for $pkg; using cached $(basename "$file")"
        printf '%s\n' "$file"
        return 0
    fi
    read -r name ver arch <<<"$cand"
    file=$QOMVM_DEB_CACHE/${name}_${ver//:/%3a}_${arch}.deb
    if [[ ! -s $file ]]; then
        tmp=$(mktemp -d "$QOMVM_DEB_CACHE/.dl.XXXXXX")
        qomvm_log "downloading $name $ver"
        if ! (cd "$tmp" && apt-get download -qq -o APT::Sandbox::User=root "$name=$ver" >&2); then
            qomvm_apt_update || true
            if ! cand=$(deb_candidate "$pkg"); then rm -rf "$tmp"; qomvm_die "apt knows no package '$pkg'"; fi
            read -r name ver arch <<<"$cand"
            file=$QOMVM_DEB_CACHE/${name}_${ver//:/%3a}_${arch}.deb
            (cd "$tmp" && apt-get download -qq -o APT::Sandbox::User=root "$name=$ver" >&2) ||
                { rm -rf "$tmp"; qomvm_die "apt-get download $name=$ver failed"; }
        fi
        local got
        got=$(find "$tmp" -maxdepth 1 -name '*.deb' | head -n1)
        [[ -n $got ]] || { rm -rf "$tmp"; qomvm_die "apt-get download $name=$ver produced no .deb"; }
        mv -f "$got" "$file"
        rm -rf "$tmp"
    fi
    printf '%s\n' "$file"
}

# deb_kernel_package META: resolve a kernel metapackage (linux-image-amd64,
# linux-image-cloud-amd64) to the versioned image package it depends on. Falls
# back to the newest cached versioned package when apt cannot answer.
deb_kernel_package() {
    local meta=$1 flavour=${1#linux-image-} real file
    if real=$(deb_resolve_meta "$meta" "^linux-image-[0-9]"); then
        printf '%s\n' "$real"
        return 0
    fi
    file=$(find "$QOMVM_DEB_CACHE" -maxdepth 1 -name "linux-image-[0-9]*-${flavour}_*.deb" -printf '%T@ %p\n' 2>/dev/null |
        sort -n | tail -n1 | cut -d' ' -f2-)
    [[ -n $file ]] || qomvm_die "cannot resolve $meta to a linux-image package (apt-cache show $meta failed)"
    file=$(basename "$file")
    printf '%s\n' "${file%%_*}"
}

# deb_extract DEB DESTDIR [TAR_WILDCARD...]: extract DEB (all of it, or only
# the members matching the wildcards, e.g. './boot/vmlinuz-*') into DESTDIR.
# Wildcards that match nothing are not an error (the caller checks what it got).
deb_extract() {
    local deb=$1 dest=$2 err
    shift 2
    mkdir -p "$dest"
    if [[ $# -eq 0 ]]; then
        dpkg-deb -x "$deb" "$dest" || qomvm_die "dpkg-deb -x $deb failed"
        return 0
    fi
    err=$(dpkg-deb --fsys-tarfile "$deb" | tar -x -C "$dest" --wildcards "$@" 2>&1) && return 0
    err=$(grep -v -e 'Not found in archive' -e 'Exiting with failure status' <<<"$err" || true)
    [[ -z $err ]] || qomvm_die "extracting from $(basename "$deb") failed: $err"
}

# qomvm_lock FILE: hold an exclusive lock on FILE until qomvm_unlock or the
# process exits, so concurrent runs do not build the same cache entry twice.
QOMVM_LOCK_FD=
qomvm_lock() {
    mkdir -p "$(dirname "$1")"
    exec {QOMVM_LOCK_FD}>"$1"
    flock "$QOMVM_LOCK_FD"
}

# qomvm_unlock: release the lock taken by qomvm_lock.
qomvm_unlock() {
    [[ -n $QOMVM_LOCK_FD ]] || return 0
    exec {QOMVM_LOCK_FD}>&-
    QOMVM_LOCK_FD=
}

# qomvm_mkcpio SRCDIR OUT.gz BUSYBOX: pack SRCDIR as a gzip'd newc cpio with
# every file owned by 0:0 (no root needed), using busybox's cpio.
qomvm_mkcpio() {
    local src=$1 out=$2 bb=$3
    (cd "$src" && find . -mindepth 1 | LC_ALL=C sort | "$bb" cpio -o -H newc -R 0:0 2>/dev/null) |
        gzip -6n >"$out.tmp" || qomvm_die "creating $out failed"
    mv -f "$out.tmp" "$out"
}
