#!/usr/bin/env bash
# Builds the previous release's binaries (gpupool-scheduler, gpupool-agent,
# gpupool) for tests/upgrade.rs, from the commit tests/previous-release
# names, into $CARGO_TARGET_DIR (default target)/previous-release/COMMIT/.
# Does nothing when they are already there. Needs the git history that
# holds the commit (a clone of main has it; a shallow clone does not).
set -euo pipefail
# A relative CARGO_TARGET_DIR is the caller's, as cargo reads it.
target=$(realpath -m "${CARGO_TARGET_DIR:-$(dirname "$0")/../target}")
cd "$(dirname "$0")/.."
field() { sed -n "s/^$1 = \"\(.*\)\"$/\1/p" tests/previous-release; }
version=$(field version)
commit=$(field commit)
out="$target/previous-release/$commit"
bins=(gpupool-scheduler gpupool-agent gpupool)
# One build at a time (two tests may ask at once); the second finds it done.
mkdir -p "$out"
exec 9>"$out/.lock"
flock 9
if [ -x "$out/bin/gpupool" ] && [ -x "$out/bin/gpupool-agent" ] && [ -x "$out/bin/gpupool-scheduler" ]; then
    echo "previous release $version ($commit) already built in $out/bin"
    exit 0
fi
if ! git cat-file -e "$commit^{commit}" 2>/dev/null; then
    # A shallow clone: fetch the commit from where this one came from.
    git fetch --quiet origin "$commit" 2>/dev/null || git fetch --quiet --unshallow 2>/dev/null || true
fi
if ! git cat-file -e "$commit^{commit}" 2>/dev/null; then
    echo "error: commit $commit (release $version) is not in this clone's history;" >&2
    echo "       fetch it (git fetch --unshallow, or clone main without --depth)" >&2
    exit 1
fi
src="$out/src"
rm -rf "$src"
mkdir -p "$src" "$out/bin"
git archive "$commit" | tar -x -C "$src"
echo "== building release $version ($commit) in $src"
# Its own target dir: the binaries' names are the same as this checkout's.
# No debug info: a quicker link, a third of the size.
(cd "$src" && CARGO_TARGET_DIR="$target/previous-release/target" CARGO_PROFILE_DEV_DEBUG=0 \
    cargo build --locked --bins -p gpupool-scheduler -p gpupool-agent -p gpupool-cli)
for b in "${bins[@]}"; do
    cp "$target/previous-release/target/debug/$b" "$out/bin/$b.tmp"
    mv "$out/bin/$b.tmp" "$out/bin/$b"
done
# Only the binaries are kept (the build tree is about 2 GB).
rm -rf "$src" "$target/previous-release/target"
"$out/bin/gpupool-scheduler" --version
