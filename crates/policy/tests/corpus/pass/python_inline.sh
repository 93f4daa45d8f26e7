python3 -c 'import json, sys; print(json.dumps(sys.argv))' a b
