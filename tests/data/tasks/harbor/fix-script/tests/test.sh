#!/bin/bash
pass=0; total=0
while read -r a b want; do
  total=$((total + 1))
  [ "$(bash /app/sum.sh "$a" "$b")" = "$want" ] && pass=$((pass + 1))
done < /tests/cases.txt
echo "$pass of $total cases pass"
[ "$pass" -eq "$total" ] && echo 1 > /logs/verifier/reward.txt || echo 0 > /logs/verifier/reward.txt
