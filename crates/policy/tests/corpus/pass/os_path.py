import os
import os.path

base = os.path.dirname(os.path.abspath(__file__))
for name in os.listdir(base):
    full = os.path.join(base, name)
    if os.path.isfile(full):
        print(name, os.path.getsize(full))
