#!/usr/bin/env bash
# `moela bench` at two git revisions, one after the other on this machine, for a before/after check.
#
#   bench/compare_revisions.sh BASE [HEAD_OR_WORKTREE] [moela bench flags...]
#   bench/compare_revisions.sh HEAD~1 worktree --batches 1 8 32
#
# BASE is checked out into a temporary git worktree and benchmarked with the active Python (the
# worktree's moela shadows the installed one); the second revision is "worktree" (this checkout as it
# is, uncommitted changes included, the default) or another revision. Each run writes its JSON under
# bench/results/compare-<date>/<label>/ and the two tables are printed one after the other.
set -euo pipefail
base=$1; shift
other=${1:-worktree}; [ $# -gt 0 ] && shift
root=$(git rev-parse --show-toplevel)
out="$root/bench/results/compare-$(date +%F)"
tmp=$(mktemp -d)
trap 'git -C "$root" worktree remove --force "$tmp/base" >/dev/null 2>&1 || true; git -C "$root" worktree remove --force "$tmp/other" >/dev/null 2>&1 || true; rm -rf "$tmp"' EXIT
run() {  # label, source tree, moela bench flags...
    local label=$1 tree=$2
    shift 2
    echo "== $label ($(git -C "$tree" rev-parse --short HEAD)$([ "$tree" = "$root" ] && ! git -C "$root" diff --quiet HEAD && echo ' + uncommitted changes'))"
    (cd "$tree" && PYTHONPATH="$tree" python -m moela.bench --out "$out/$label" "$@")
}
git -C "$root" worktree add --detach "$tmp/base" "$base" >/dev/null
run "base-$(git -C "$root" rev-parse --short "$base")" "$tmp/base" "$@"
if [ "$other" = worktree ]; then
    run worktree "$root" "$@"
else
    git -C "$root" worktree add --detach "$tmp/other" "$other" >/dev/null
    run "$other" "$tmp/other" "$@"
fi
