# expect: python.process
import os
f = os.execv
f('/bin/sh', ['sh'])
