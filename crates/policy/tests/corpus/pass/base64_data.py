import base64

encoded = base64.b64encode(b'hello')
print(base64.b64decode(encoded).decode())
