#!/bin/bash
set -e
grep -q "bar and bar" /app/docs/a.txt
grep -q "no match" /app/docs/b.txt
grep -qx "bar" /app/docs/sub/c.txt
grep -qx "foo" /app/docs/keep.md
echo "PASSED all"
