#!/bin/bash
echo cloud > /work/answer.txt
