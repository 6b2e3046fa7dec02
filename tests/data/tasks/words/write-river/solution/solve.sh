#!/bin/bash
echo river > /work/answer.txt
