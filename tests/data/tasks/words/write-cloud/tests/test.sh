#!/bin/bash
[ "$(cat /work/answer.txt 2>/dev/null)" = "cloud" ] && echo 1 > /logs/verifier/reward.txt || echo 0 > /logs/verifier/reward.txt
