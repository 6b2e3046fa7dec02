#!/bin/bash
bash /solution/extract.sh /app/bundle.tar.gz > /app/answer.txt
