#!/bin/bash
echo "hello from greet"
