timeout 60 python3 train.py --epochs 3 > log.txt 2>&1
