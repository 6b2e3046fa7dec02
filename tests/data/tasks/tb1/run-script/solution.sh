#!/bin/bash
chmod +x /app/greet.sh
/app/greet.sh > /app/out.txt
