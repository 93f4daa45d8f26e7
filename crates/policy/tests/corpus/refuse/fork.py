# expect: python.process
import os
if os.fork() == 0:
    os.execvp('id', ['id'])
