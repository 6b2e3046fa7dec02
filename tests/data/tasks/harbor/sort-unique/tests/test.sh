#!/bin/bash
printf 'alice\nbob\ncarol\ndave\n' > /tmp/want.txt
if diff -q /tmp/want.txt /app/sorted.txt; then echo 1 > /logs/verifier/reward.txt; else echo 0 > /logs/verifier/reward.txt; fi
