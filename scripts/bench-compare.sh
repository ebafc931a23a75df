#!/usr/bin/env bash
# Compares the criterion benches of this checkout with those of another commit, in one run:
# builds both (the other in a temporary worktree), then runs them interleaved, twice, in
# opposite orders, so drift and a busy machine hit both alike. Prints each benchmark's best
# point estimate per side and the ratio after/before.
#
#   scripts/bench-compare.sh BASE_COMMIT [BENCH...]     (default benches: qom exit_handling)
set -euo pipefail
cd "$(dirname "$0")/.."
base=${1:?usage: scripts/bench-compare.sh BASE_COMMIT [BENCH...]}
shift
benches=("${@:-qom}")
[ $# -eq 0 ] && benches=(qom exit_handling)
out=$(mktemp -d /tmp/qomvm-bench-compare.XXXXXX)
tree="$out/base-tree"
git worktree add --detach "$tree" "$base" >/dev/null
trap 'git worktree remove --force "$tree" >/dev/null 2>&1 || true' EXIT

exe() { # TARGET_DIR BENCH -> path of the bench executable
    ls -t "$1"/release/deps/"$2"-* | grep -v '\.d$' | head -1
}
for side in base head; do
    dir=.; [ $side = base ] && dir=$tree
    (cd "$dir" && CARGO_TARGET_DIR="$out/target-$side" cargo bench --quiet --no-run \
        $(printf -- '--bench %s ' "${benches[@]}") >/dev/null 2>&1)
done
opts=(--bench --noplot --warm-up-time 1 --measurement-time 3)
for round in 1 2; do
    order=(base head); [ $round = 2 ] && order=(head base)
    for b in "${benches[@]}"; do
        for side in "${order[@]}"; do
            "$(exe "$out/target-$side" "$b")" "${opts[@]}" >"$out/r$round-$side-$b.log" 2>&1
        done
    done
done
python3 - "$out" <<'PY'
import collections, glob, re, sys
unit = {"ps": 1e-3, "ns": 1.0, "µs": 1e3, "us": 1e3, "ms": 1e6}
best = collections.defaultdict(dict)
for path in glob.glob(f"{sys.argv[1]}/r*.log"):
    side = "base" if "-base-" in path else "head"
    name = None
    for line in open(path, encoding="utf-8"):
        m = re.match(r"^(\S+/\S+)", line)
        if m:
            name = m.group(1)
        m = re.search(r"time:\s+\[\S+ \S+ (\S+) (\S+) ", line)
        if m and name:
            v = float(m.group(1)) * unit[m.group(2)]
            best[name][side] = min(v, best[name].get(side, v))
print(f"{'benchmark':45} {'before ns':>12} {'after ns':>12} {'after/before':>13}")
for name in sorted(best):
    b, h = best[name].get("base"), best[name].get("head")
    if b and h:
        print(f"{name:45} {b:12.2f} {h:12.2f} {h / b:13.2f}")
PY
echo "logs: $out"
