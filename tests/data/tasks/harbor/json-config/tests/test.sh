#!/bin/bash
if grep -q '"debug": true' /app/config.json && grep -q '"port": 8080' /app/config.json; then
  echo '{"reward": 1.0}' > /logs/verifier/reward.json
else
  echo '{"reward": 0.0}' > /logs/verifier/reward.json
fi
