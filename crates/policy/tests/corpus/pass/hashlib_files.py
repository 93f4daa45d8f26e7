import hashlib

h = hashlib.sha256()
with open('data.bin', 'rb') as f:
    for chunk in iter(lambda: f.read(65536), b''):
        h.update(chunk)
print(h.hexdigest())
