#!/bin/bash
echo tiger > /work/answer.txt
