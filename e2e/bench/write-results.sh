#!/usr/bin/env bash
# Puts a benchmark's section into docs/results.md, replacing its previous one.
# Usage: e2e/bench/write-results.sh NAME SECTION-TEXT   (the text carries <!-- NAME:start/end -->)
set -euo pipefail
cd "$(dirname "$0")/../.."
name=$1 section=$2
results=docs/results.md
mkdir -p docs
[[ -f "$results" ]] || printf '# Benchmark results\n\nFigures measured on our machines; each section names the command that produced it.\n' >"$results"
python3 - "$results" "$name" "$section" <<'PY'
import re, sys
path, name, section = sys.argv[1], sys.argv[2], sys.argv[3]
text = open(path).read()
pattern = re.compile(r"<!-- %s:start -->.*?<!-- %s:end -->" % (re.escape(name), re.escape(name)), re.S)
text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip() + "\n\n" + section + "\n"
open(path, "w").write(text)
PY
echo "written to $results"
