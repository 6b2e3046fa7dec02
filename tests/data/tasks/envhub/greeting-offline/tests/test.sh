#!/bin/bash
[ "$(cat /app/out.txt 2>/dev/null)" = "hello ada" ] && echo 1 > /logs/verifier/reward.txt || echo 0 > /logs/verifier/reward.txt
