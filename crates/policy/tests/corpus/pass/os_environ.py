import os

home = os.environ.get('HOME', '/')
os.makedirs(os.path.join(home, 'out'), exist_ok=True)
print(os.getcwd(), os.getpid())
