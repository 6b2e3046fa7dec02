#!/bin/bash
[ "$(tr -d '[:space:]' < /app/count.txt)" = "9" ]
