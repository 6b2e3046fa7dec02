#!/bin/bash
echo "$GREETING $(head -n 1 /app/names.txt)" > /app/out.txt
