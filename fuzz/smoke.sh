#!/usr/bin/env bash
# Fuzz smoke run (CI): each target for FUZZ_SECONDS (default 60) seconds on stable Rust,
# without a sanitizer (`-s none`) but with debug assertions and overflow checks (`-a`).
# New inputs go to a scratch directory; the committed seeds in corpus/<target>/ are only
# read. A crash fails the run and leaves the input in fuzz/artifacts/<target>/.
#
# Long runs with AddressSanitizer need nightly features; on stable:
#   RUSTC_BOOTSTRAP=1 cargo fuzz run TARGET /tmp/scratch-corpus corpus/TARGET
set -euo pipefail
cd "$(dirname "$0")"
SECS="${FUZZ_SECONDS:-60}"
TARGETS="${FUZZ_TARGETS:-open_bytes ops_model crash_recovery}"

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "== installing cargo-fuzz"
  cargo install cargo-fuzz --locked
fi

cargo fuzz build -s none -a
for t in $TARGETS; do
  scratch="$(mktemp -d)"
  echo "== fuzz $t for ${SECS}s"
  # -timeout: an input running over 30 s is a hang; -max_len: store files up to 64 KiB.
  log="$scratch.log"
  set +e
  cargo fuzz run -s none -a "$t" "$scratch" "corpus/$t" -- \
    -max_total_time="$SECS" -timeout=30 -rss_limit_mb=4096 -max_len=65536 -print_final_stats=1 \
    >"$log" 2>&1
  status=$?
  set -e
  grep -E "^(INFO: Seed|Done|stat::number_of_executed_units|stat::peak_rss_mb)" "$log" || true
  if [ "$status" -ne 0 ]; then
    tail -n 60 "$log"
  fi
  rm -f "$log"
  rm -rf "$scratch"
  if [ "$status" -ne 0 ]; then
    echo "fuzz target $t failed (exit $status); see fuzz/artifacts/$t/"
    exit 1
  fi
done
echo "fuzz smoke: all targets ran ${SECS}s without a crash"
