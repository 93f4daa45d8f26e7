import json
import sys

data = json.load(sys.stdin)
json.dump({k: len(v) for k, v in data.items()}, sys.stdout)
