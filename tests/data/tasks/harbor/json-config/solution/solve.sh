#!/bin/bash
sed -i 's/"debug": false/"debug": true/' /app/config.json
