#!/usr/bin/env bash
# A/B whole revisions of the package in one runner call (sitecustomize.py here swaps one module;
# a change across modules -- the model's cache layout, a new kernel argument -- needs the whole
# tree of each side, its benchmarks included):
#
#   bash bench/ab/tree.sh make REV                  # here: devtmp/trees/REV = gdn_jax, kernels
#                                                   # and bench (results left out) at REV
#   bash bench/ab/tree.sh run REV SCRIPT [ARGS...]  # on the runner: REV's bench/SCRIPT, with
#                                                   # REV's package imported, not the install
#
# Carry the trees: run(..., carry=["devtmp/trees"]) (a few MB each). `run` cds into the tree and
# puts it first on PYTHONPATH: Python looks there before the editable install's finder (which
# sits last on sys.meta_path), and the tree's gdn_jax/kernels links to its kernels/ as the
# install maps it. Left out: bench/results, the embedded model's assets and tests/ (so not for
# bench_generate.py without --model, nor for the scripts that import tests/oracle.py:
# ncu_kernels.py, flashinfer_gdn.py). Relative paths in ARGS are the tree's: give --out an
# absolute one ($OUT/...).
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cmd=${1:?make or run}; rev=${2:?a revision}; shift 2
tree=$root/devtmp/trees/$rev
case $cmd in
    make)
        git -C "$root" rev-parse --verify --quiet "$rev^{commit}" >/dev/null \
            || { echo "tree.sh: $rev is no revision" >&2; exit 2; }
        [[ $rev != */* && $rev != .* ]] \
            || { echo "tree.sh: name the revision plainly (no / or leading .)" >&2; exit 2; }
        rm -rf "$tree" && mkdir -p "$tree"
        git -C "$root" archive "$rev" gdn_jax kernels bench \
            | tar -x -C "$tree" --exclude bench/results --exclude gdn_jax/assets
        ln -sfn ../kernels "$tree/gdn_jax/kernels"
        echo "$tree: $(git -C "$root" log -1 --format='%h %s' "$rev" | cut -c1-80)"
        ;;
    run)
        [[ -d $tree ]] || { echo "no tree $tree: make it here and carry devtmp/trees" >&2; exit 2; }
        script=${1:?a bench script}; shift
        cd "$tree" && PYTHONPATH=$tree${PYTHONPATH:+:$PYTHONPATH} python "bench/$script" "$@"
        ;;
    *) echo "usage: tree.sh make REV | run REV SCRIPT [ARGS...]" >&2; exit 2 ;;
esac
