#!/usr/bin/env bash
# Checks and unit-tests the alert rules exactly as they ship.
#
# The PrometheusRule resources in deploy/k8s are the one source of the rules. promtool reads
# plain rule files (`groups:` at the top), which is what a PrometheusRule's `spec:` is: this
# script cuts each resource's `spec:` out (removing its two spaces of indentation), runs
# `promtool check rules` on the result, then `promtool test rules` on the unit tests here.
#
#   deploy/k8s/base/<dir>/prometheusrule.yaml  ->  <dir>.rules.yaml (in a temporary directory)
#   deploy/prometheus-tests/<dir>.test.yaml       its unit tests, `rule_files: [<dir>.rules.yaml]`
#
# Every PrometheusRule found must have its test file, and every alert in it must have at least
# one test case where it fires (`exp_alerts:` with entries) and one where it stays quiet
# (`exp_alerts: []`); in a test file, write `alertname:` before `exp_alerts:`.
#
# Usage: deploy/prometheus-tests/run-promtool.sh   (from anywhere; PROMTOOL=/path overrides)
# Exit: 0 all passed; 1 a check or test failed; 127 promtool not found (Debian: apt-get install
# prometheus, which ships /usr/bin/promtool; the server need not run).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
promtool=${PROMTOOL:-promtool}
if ! command -v "$promtool" >/dev/null 2>&1; then
  echo "promtool not found (apt-get install prometheus, or set PROMTOOL)" >&2
  exit 127
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# Every file under deploy/k8s holding a PrometheusRule.
mapfile -t sources < <(grep -rl --include='*.yaml' '^kind: PrometheusRule$' "$root/deploy/k8s" | sort)
if [ ${#sources[@]} -eq 0 ]; then
  echo "no PrometheusRule found under deploy/k8s" >&2
  exit 1
fi

failed=0
rule_files=()
for src in "${sources[@]}"; do
  name=$(basename "$(dirname "$src")")
  out="$work/$name.rules.yaml"
  rel=${src#"$root"/}
  # The lines after `spec:`, two spaces less indented. Anything that would make that wrong is
  # refused rather than guessed at: a second document, a top-level key after `spec:`, a line
  # under `spec:` indented by less than two spaces.
  if ! awk -v file="$rel" '
      /^---/ { print file ": more than one document; keep one PrometheusRule per file" > "/dev/stderr"; bad = 1; exit }
      in_spec && /^[^ #]/ { print file ":" NR ": top-level key after spec: (keep spec: last)" > "/dev/stderr"; bad = 1; exit }
      in_spec && /^ ?[^ ]/ && !/^ ?#/ { print file ":" NR ": under spec: but indented by less than 2" > "/dev/stderr"; bad = 1; exit }
      in_spec { sub(/^  /, ""); print; next }
      /^spec:[ ]*$/ { in_spec = 1 }
      END { if (!bad && !in_spec) { print file ": no spec:" > "/dev/stderr"; exit 1 } if (bad) exit 1 }
    ' "$src" >"$out"; then
    failed=1
    continue
  fi
  rule_files+=("$out")

  test_file="$here/$name.test.yaml"
  if [ ! -f "$test_file" ]; then
    echo "$rel: no unit tests (expected ${test_file#"$root"/})" >&2
    failed=1
    continue
  fi
  cp "$test_file" "$work/"

  # Coverage: each alert fires in some case and stays quiet in another.
  alerts=$(sed -n 's/^ *- alert: *\([A-Za-z0-9_:]*\).*/\1/p' "$out" | sort -u)
  coverage=$(awk '
      /^ *(- )?alertname:/ { sub(/^ *(- )?alertname: */, ""); sub(/ *(#.*)?$/, ""); current = $0; next }
      /^ *exp_alerts:/ {
        if (current == "") { print "ERROR exp_alerts without a preceding alertname at line " NR; next }
        if ($0 ~ /exp_alerts: *\[ *\] *(#.*)?$/) quiet[current] = 1; else fires[current] = 1
        current = ""
      }
      END { for (a in fires) print "fires " a; for (a in quiet) print "quiet " a }
    ' "$test_file")
  if grep -q '^ERROR' <<<"$coverage"; then
    grep '^ERROR' <<<"$coverage" | sed "s|^ERROR|${test_file#"$root"/}:|" >&2
    failed=1
  fi
  for alert in $alerts; do
    for case in fires quiet; do
      if ! grep -qx "$case $alert" <<<"$coverage"; then
        echo "${test_file#"$root"/}: no test case where $alert $( [ $case = fires ] && echo fires || echo 'stays quiet')" >&2
        failed=1
      fi
    done
  done
done

# Test files whose rules no longer exist.
for test_file in "$here"/*.test.yaml; do
  name=$(basename "$test_file" .test.yaml)
  if [ ! -f "$work/$name.rules.yaml" ]; then
    echo "${test_file#"$root"/}: no PrometheusRule in deploy/k8s/base/$name to test" >&2
    failed=1
  fi
done

if [ ${#rule_files[@]} -gt 0 ]; then
  echo "== promtool check rules (${#rule_files[@]} files, from ${sources[*]#"$root"/})"
  (cd "$work" && "$promtool" check rules --lint=all --lint-fatal "${rule_files[@]##*/}") || failed=1
fi
tests=("$work"/*.test.yaml)
if [ -e "${tests[0]}" ]; then
  echo "== promtool test rules"
  (cd "$work" && "$promtool" test rules "${tests[@]##*/}") || failed=1
fi

if [ "$failed" != 0 ]; then
  echo "FAILED: alert rules" >&2
  exit 1
fi
echo "alert rules: checked and tested"
